"""Fixtures for the hostile-file tests: a warmed-up process, canary modules, a victim file."""

from __future__ import annotations

from pathlib import Path

import pytest

from _attack import Canary, make_canary, warm_up


@pytest.fixture(scope="session", autouse=True)
def _warm(tmp_path_factory: pytest.TempPathFactory) -> None:
    warm_up(tmp_path_factory.mktemp("warm"))


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Canary:
    """A module on sys.path that writes a marker when imported or when its ``Thing`` is called."""
    found = make_canary(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return found


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """An unrelated file with content that no load may touch."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path
