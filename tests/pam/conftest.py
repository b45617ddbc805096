"""Fixtures shared by the PAM tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..pamenv import compile_test_modules


@pytest.fixture(scope="session")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test modules in tests/pam/modules, compiled once: {"segv": path, "once": path, ...}."""
    return compile_test_modules(tmp_path_factory.mktemp("pam-modules"))
