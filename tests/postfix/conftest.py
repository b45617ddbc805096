"""Postfix against authd: slow to start, so a stage of its own (`scripts/test-mail`).

The main suite skips collecting these; the stage script sets AUTHD_MAIL_STAGE=1.
"""

import os

collect_ignore_glob = [] if os.environ.get("AUTHD_MAIL_STAGE") == "1" else ["test_*.py"]
