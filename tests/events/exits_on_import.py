"""A module that calls ``sys.exit()`` when imported: a reload naming it must fail, not end authd."""

import sys

sys.exit(3)
