"""The man pages the package ships, rendered from docs/ as the build does, are clean roff."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff-base not installed")
def test_man_pages_render_without_warnings(tmp_path: Path) -> None:
    subprocess.run([sys.executable, ROOT / "scripts" / "md2man.py", "--all", tmp_path], check=True, timeout=60)
    pages = sorted(p.name for p in tmp_path.iterdir())
    assert pages == ["authctl.1", "authd.8", "authd.toml.5"]
    for page in pages:
        done = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-ww", "-z", tmp_path / page], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "LC_ALL": "C.UTF-8"})
        # tbl cannot always justify a narrow column: that warning is typography, not an error.
        problems = [line for line in done.stderr.splitlines() if "cannot adjust line" not in line]
        assert done.returncode == 0 and problems == [], (page, problems)
        text = (tmp_path / page).read_text(encoding="ascii")
        assert text.count(".SH NAME") == 1 and ".SH \"SYNOPSIS\"" in text
    authctl = (tmp_path / "authctl.1").read_text()
    assert "AUTHD_SOCKET" in authctl and "EXIT STATUS" in authctl
    assert "max_connections" in (tmp_path / "authd.toml.5").read_text(), "the reference is in the page"
