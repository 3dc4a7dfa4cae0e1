"""The ``sb3-safe-save`` command: in-process through ``main()``, plus real subprocess runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3

from _compare import assert_same_model
from _naive import make_naive_model
from lang_dqn import ModuleExpert, UnpicklableExpert, make_model
from sb3_safe_save import file_sha256, read_manifest, safe
from sb3_safe_save._cli import _color, main
from sb3_safe_save._manifest import FORMAT_VERSION

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A clean PPO file, the lang_dqn scenario with a naively registered expert (hazards), a stock SB3 zip and a file
    that is not ours."""
    root = tmp_path_factory.mktemp("cli")
    ppo = safe(PPO)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16, n_epochs=1, seed=0)
    ppo.learn(16)
    ppo.save(root / "ppo.safetensors")
    PPO.save(ppo, root / "ppo.zip")  # the stock SB3 save
    make_naive_model(ModuleExpert(), net_arch=[8]).save(root / "lang.safetensors")  # warned at build (make_naive_model)
    make_model(ModuleExpert(), net_arch=[8]).save(root / "guarded.safetensors")  # the expert held through external()
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return {
        "ppo": root / "ppo.safetensors",
        "zip": root / "ppo.zip",
        "lang": root / "lang.safetensors",
        "guarded": root / "guarded.safetensors",
        "junk": root / "junk.safetensors",
    }


# -------------------------------------------------------------------------------------------- inspect
def test_inspect_text(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(files["lang"])]) == 0
    out = capsys.readouterr().out
    assert file_sha256(files["lang"]) in out
    assert f"Format      sb3_safe_save {FORMAT_VERSION}" in out and "stable_baselines3 2." in out
    assert "vlm_model" in out and "lang_dqn.ModuleExpert" in out and "external_module" in out
    assert "policy/q_net.q_net.0.weight" in out and "F32" in out and "8x4" in out and "128 B" in out
    assert "shared_with_target" in out


def test_inspect_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--format", "json", str(files["ppo"])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        doc["schema_version"] == 1 and doc["format_version"] == FORMAT_VERSION and doc["sha256"] == file_sha256(files["ppo"])
    )
    assert doc["algorithm"] == "stable_baselines3.ppo.ppo:PPO" and doc["size_bytes"] == files["ppo"].stat().st_size
    weight = next(t for t in doc["tensors"] if t["name"] == "policy/action_net.weight")
    assert weight == {"name": "policy/action_net.weight", "dtype": "F32", "shape": [2, 8], "bytes": 64}


@pytest.mark.parametrize("which", ["junk", "zip", "missing"])
def test_inspect_unreadable_is_exit_2(which: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = files["ppo"].parent / "missing.safetensors" if which == "missing" else files[which]
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    if which == "zip":
        assert "convert" in err and "--trust-pickle" in err


# ---------------------------------------------------------------------------------------------- audit
def test_audit_exit_codes(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ppo, lang = str(files["ppo"]), str(files["lang"])
    assert main(["audit", ppo]) == 0
    assert main(["audit", ppo, "--max-size", "5MB"]) == 0
    assert main(["audit", ppo, "--max-size", "1KB"]) == 1  # over budget
    assert main(["audit", ppo, "--max-size", "1KB", "--fail-on", "never"]) == 1  # the budget always counts
    assert main(["audit", lang]) == 1  # shared_with_target is an error
    assert main(["audit", lang, "--fail-on", "never"]) == 0
    assert main(["audit", ppo, lang]) == 1
    assert main(["audit", ppo, "--no-placeholders"]) == 0
    assert main(["audit", str(files["junk"])]) == 2
    assert main(["audit", ppo, str(files["junk"])]) == 2  # unreadable wins over failed
    assert main(["audit", str(files["ppo"].parent / "nope.safetensors")]) == 2
    assert main(["audit", ppo, "--max-size", "5 XB"]) == 2  # usage error
    assert main(["audit", ppo, "--fail-on", "sometimes"]) == 2
    assert main(["audit"]) == 2
    assert main([]) == 2
    capsys.readouterr()


def test_audit_fail_on_and_placeholder_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "unpicklable.safetensors"
    # audited as CustomDQN.load decides (--algo): only an info (the placeholder), as CustomDQN's own module
    # is trusted, and a non-module expert has no parameters for target updates to touch, so no hazard either
    make_model(UnpicklableExpert(), net_arch=[8]).save(path)
    algo = ["--algo", "lang_dqn:CustomDQN"]
    assert main(["audit", str(path), *algo]) == 0
    assert main(["audit", str(path), "--fail-on", "warning", *algo]) == 0
    assert main(["audit", str(path), "--fail-on", "info", *algo]) == 1
    assert main(["audit", str(path), "--fail-on", "info", "--trust", "lang_dqn.*"]) == 1
    assert main(["audit", str(path), "--no-placeholders", *algo]) == 1
    assert main(["audit", str(path), "--no-placeholders", "--allow-placeholder", "vlm_model", *algo]) == 0
    # without --algo the audit decides as a plain DQN load, never trusting the file's own word
    # ("algorithm": "lang_dqn:CustomDQN"): the policy class from lang_dqn is untrusted
    assert main(["audit", str(path)]) == 0
    assert main(["audit", str(path), "--fail-on", "warning"]) == 1
    assert main(["audit", str(path), "--fail-on", "warning", "--trust", "lang_dqn:CustomDQNPolicy"]) == 0
    capsys.readouterr()


def test_audit_text_goes_to_stdout_and_summary_to_stderr(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(files["lang"]), "--max-size", "5MiB"]) == 1
    captured = capsys.readouterr()
    assert "Components" in captured.out and "shared_with_target" in captured.out and "5.0 MiB" in captured.out
    assert "\x1b[" not in captured.out + captured.err  # not a TTY: no colour
    assert captured.err.startswith("FAIL: ") and "audited 1 file: 0 ok, 1 failed, 0 unreadable" in captured.err


def test_audit_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(files["ppo"]), str(files["lang"]), "--format", "json", "--max-size", "1 MB"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == 1 and doc["ok"] is False and doc["errors"] == []
    ppo, lang = doc["reports"]
    assert ppo["ok"] is True and ppo["total_bytes"] == files["ppo"].stat().st_size and ppo["max_bytes"] == 1_000_000
    assert lang["ok"] is False
    assert {f["code"] for f in lang["findings"]} >= {"placeholder", "shared_with_target", "external_in_optimizer"}
    placeholder = next(f for f in lang["findings"] if f["code"] == "placeholder")
    assert placeholder["key"] == "vlm_model" and placeholder["size_bytes"] > 0 and placeholder["severity"] == "info"


def test_audit_json_lists_unreadable_files(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(files["ppo"]), str(files["junk"]), "--format", "json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and len(doc["reports"]) == 1 and doc["errors"][0]["source"] == str(files["junk"])


def test_audit_markdown_to_file(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.md"
    assert main(["audit", str(files["lang"]), "--format", "markdown", "-o", str(out)]) == 1
    assert capsys.readouterr().out == ""
    md = out.read_text()
    assert md.startswith("### ❌ `") and "| severity | code | paths | detail |" in md and "`shared_with_target`" in md


def test_colour_only_on_a_tty_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert _color(Tty()) is True  # type: ignore[arg-type]
    assert _color(sys.stdout) is False or sys.stdout.isatty()
    monkeypatch.setenv("NO_COLOR", "1")
    assert _color(Tty()) is False  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- convert
def test_convert_without_trust_pickle_uses_the_safe_reader(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(files["zip"]), str(out)]) == 0
    assert "read by the safe reader: no pickle was run" in capsys.readouterr().err and out.exists()
    assert main(["convert", str(files["ppo"]), str(out), "--trust-pickle"]) == 2  # not a zip
    assert "not a zip" in capsys.readouterr().err


def _tiny(algo: type[Any]) -> Any:
    if algo in (A2C, PPO):
        kwargs: dict[str, Any] = {"n_steps": 16} | ({"batch_size": 16, "n_epochs": 1} if algo is PPO else {})
        return algo("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, seed=0, **kwargs)
    env = "CartPole-v1" if algo is DQN else "Pendulum-v1"
    return algo("MlpPolicy", env, policy_kwargs={"net_arch": [8]}, learning_starts=8, buffer_size=64, seed=0)


@pytest.mark.parametrize("algo", [A2C, PPO, DQN, SAC, TD3, DDPG], ids=lambda a: a.__name__)
def test_convert_then_load_equals_stock_load(algo: type[Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny(algo)
    model.learn(16)
    zip_path, out = tmp_path / "stock.zip", tmp_path / "converted.safetensors"
    model.save(zip_path)
    assert main(["convert", str(zip_path), str(out), "--trust-pickle"]) == 0
    assert f"({algo.__name__})" in capsys.readouterr().err
    assert read_manifest(out).base_algorithm.endswith(f":{algo.__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = algo.load(zip_path, device="cpu")
    assert_same_model(safe(algo).load(out, device="cpu"), stock)


def test_convert_with_explicit_algo(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.safetensors"
    assert main(["convert", str(files["zip"]), str(out), "--trust-pickle", "--algo", "stable_baselines3:PPO"]) == 0
    assert main(["convert", str(files["zip"]), str(out), "--trust-pickle", "--algo", "Nope"]) == 2
    assert "--algo Nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- export
def test_export_writes_a_stock_zip(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ppo.zip"
    assert main(["export", str(files["ppo"]), str(out)]) == 0
    assert "stock SB3 zip" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = PPO.load(out, device="cpu")
    assert_same_model(exported, safe(PPO).load(files["ppo"], device="cpu"))
    assert main(["export", str(files["ppo"]), str(tmp_path / "no-suffix")]) == 2


def test_export_leaves_placeholders_out_and_lists_them(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lang.zip"
    assert main(["export", str(files["guarded"]), str(out)]) == 2  # the custom policy must be trusted
    assert "--trust lang_dqn:CustomDQNPolicy" in capsys.readouterr().err
    assert main(["export", str(files["guarded"]), str(out), "--trust", "lang_dqn.*"]) == 0
    err = capsys.readouterr().err
    assert "left out placeholder 'vlm_model'" in err and "lang_dqn.ModuleExpert" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = DQN.load(out, device="cpu")
    assert stock.policy.q_net.vlm_model is None and stock.policy_kwargs["vlm_model"] is None
    original = make_model(ModuleExpert(), net_arch=[8])  # same seed: same weights
    for name in ("q_net", "q_net_target"):
        ours = {k: v for k, v in getattr(original.policy, name).state_dict().items() if "vlm_model" not in k}
        assert ours.keys() == getattr(stock.policy, name).state_dict().keys()


# ---------------------------------------------------------------------------------------- subprocess
def test_console_script_and_python_m(files: dict[str, Path]) -> None:
    script = Path(sys.executable).parent / "sb3-safe-save"
    assert script.exists(), "the console script is not installed"
    env = {**os.environ, "NO_COLOR": "1", "PYTHONPATH": EXAMPLES}
    done = subprocess.run(
        [str(script), "audit", str(files["ppo"]), "--format", "json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reports"][0]["ok"] is True
    done = subprocess.run(
        [sys.executable, "-m", "sb3_safe_save", "audit", str(files["ppo"]), "--max-size", "1KB"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "over the budget" in done.stdout and "FAIL" in done.stderr


# ------------------------------------------------------------------------------------- light commands
def test_inspect_help_and_version_import_neither_torch_nor_sb3(files: dict[str, Path]) -> None:
    """Reading a header needs no torch: ``inspect``, ``--help``, ``--version`` and ``read_manifest`` import neither it,
    SB3, gymnasium nor numpy.

    Run in a fresh interpreter on the package under test; it imports what the commands import, nothing more.
    """
    import sb3_safe_save

    code = (
        "import contextlib, io, sys\n"
        "import sb3_safe_save\n"
        "from sb3_safe_save._cli import main\n"
        f"path = {str(files['ppo'])!r}\n"
        "assert sb3_safe_save.read_manifest(path).base_algorithm == 'stable_baselines3.ppo.ppo:PPO'\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    codes = [main(['inspect', path]), main(['inspect', '--format', 'json', path]), main(['--version']),\n"
        "             main(['--help']), main(['audit', '--help'])]\n"
        "print(codes, sorted(m for m in ('torch', 'stable_baselines3', 'gymnasium', 'numpy') if m in sys.modules))\n"
        "print('PPO' in out.getvalue() and 'sb3-safe-save 0.' in out.getvalue())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(sb3_safe_save.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-3:] == ["[0, 0, 0, 0, 0] []", "True", ""], done.stdout[-500:]


def test_trust_references_are_written_module_colon_qualname(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``export --help``, its hint and the ``trusted=True`` error write ``module:QualName``; the hint works as copied."""
    from sb3_safe_save._trust import TrustList

    assert main(["export", "--help"]) == 0
    assert "'pkg.mod:Name'" in capsys.readouterr().out
    with pytest.raises(TypeError, match="'module:QualName' strings"):
        TrustList(True)  # type: ignore[arg-type]
    out = tmp_path / "lang.zip"
    assert main(["export", str(files["guarded"]), str(out)]) == 2
    hint = capsys.readouterr().err
    flags = hint.rpartition("add ")[2].split()
    assert flags == ["--trust", "lang_dqn:CustomDQNPolicy"], hint
    assert main(["export", str(files["guarded"]), str(out), *flags]) == 0
    assert out.exists()
