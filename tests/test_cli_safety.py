"""The CLI facing hostile files (issue 10, point 8): no traceback, exit codes kept, no terminal escapes.

A forged file puts ANSI (CSI/SGR), OSC (window title), C1 and bidi-override characters in every
free-text field the CLI prints: placeholder key and type, hazard message, versions, and a dict key
that ends up in a validation error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

import sb3_safe_save._cli as cli
from _hostile import edit_manifest, saved_bytes
from sb3_safe_save._cli import clean, main

ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31m\x9b31m\u202e"
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\u202e")


def forge(m: dict[str, Any]) -> None:
    m["placeholders"].append(
        {"key": f"k{ESC}", "paths": ["policy_kwargs.expert"], "type": f"t{ESC}", "reason": "declared", "hint": {"h": ESC}}
    )
    m["data"]["policy_kwargs"]["items"]["expert"] = {"kind": "placeholder", "key": f"k{ESC}"}
    m["hazards"].append({"code": "shared_with_target", "severity": "warning", "message": f"m{ESC}", "paths": ["policy"]})
    m["versions"]["python"] = f"3{ESC}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-safety") / "hostile.safetensors"
    path.write_bytes(edit_manifest(saved_bytes("PPO"), forge))
    return path


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest whose validation error quotes a dict key full of escapes."""

    def edit(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"][f"x{ESC}"] = {"kind": "bogus"}

    path = tmp_path_factory.mktemp("cli-safety") / "malformed.safetensors"
    path.write_bytes(edit_manifest(saved_bytes("PPO"), edit))
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(*texts: str) -> None:
    for text in texts:
        assert not any(c in text for c in FORBIDDEN), repr(text[:500])
        assert "Traceback" not in text


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--no-sha256"],
        ["inspect", "--format", "json"],
        ["audit", "--fail-on", "never"],
        ["audit", "--fail-on", "never", "--format", "markdown"],
        ["audit", "--fail-on", "never", "--format", "json"],
    ],
)
def test_file_text_is_escaped_in_every_output(argv: list[str], hostile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([*argv, str(hostile)], capsys)
    assert code == 0, err
    assert_clean(out, err)
    assert "pwned" in out  # shown, escaped: \x1b]0;pwned\x07


@pytest.mark.parametrize("command", ["inspect", "audit"])
def test_error_messages_quoting_the_file_are_escaped(
    command: str, malformed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run([command, str(malformed)], capsys)
    assert code == 2 and "error:" in err
    assert_clean(out, err)


def test_an_unexpected_exception_is_one_line_and_exit_2(
    hostile: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"internal {ESC}")

    monkeypatch.setattr(cli, "audit", boom)
    code, out, err = run(["audit", str(hostile), str(hostile)], capsys)
    assert code == 2
    assert err.count("error: ") == 2 and "RuntimeError" in err  # both files reported, the run went on
    assert_clean(out, err)
    monkeypatch.setattr(cli, "_cmd_inspect", lambda args: boom())
    code, out, err = run(["inspect", str(hostile)], capsys)
    assert code == 2 and "RuntimeError" in err
    assert_clean(out, err)


def test_clean_escapes_controls_and_keeps_text() -> None:
    assert clean("policy.q_net[é 中]") == "policy.q_net[é 中]"
    assert clean("a\x1b[31mb\nc\u202ed\x9be") == "a\\x1b[31mb\\x0ac\\u202ed\\x9be"


def test_print_system_info_prints_no_escape(capsys: pytest.CaptureFixture[str]) -> None:
    from stable_baselines3 import PPO

    from sb3_safe_save import safe

    data = edit_manifest(saved_bytes("PPO"), lambda m: m["versions"].update(python=f"3{ESC}"))
    safe(PPO).load(io.BytesIO(data), print_system_info=True)
    out, _ = capsys.readouterr()
    assert "== SAVED WITH ==" in out
    assert_clean(out)
