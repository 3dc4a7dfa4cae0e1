"""Forged references, slots, factories, data keys and rebind paths (issue 10, points 1-5 and 9).

Each attack starts from a real saved PPO, rewrites its manifest as an attacker would (checksums
recomputed) and is loaded with a plain ``safe(PPO).load(path)``. The outcome is checked, not the
message: only a ``SafeSaveError``; no marker file, no canary module imported, no process-wide class
or module attribute changed, no file created in the working directory, the unrelated victim file
intact. Then ``audit`` and the CLI's ``audit --fail-on warning`` must not call any of these files OK.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch as th
from stable_baselines3 import PPO

from _attack import Canary, base, forge, placeholder, refused, run_cli, with_placeholder, write
from sb3_safe_save import SafeSaveError, audit, safe

POPEN = "stable_baselines3.common.utils:th._strobelight.cli_function_profiler.subprocess.Popen"
SYSTEM = "stable_baselines3.ppo.ppo:th.os.system"


@dataclass
class Ctx:
    tmp: Path
    canary: Canary
    victim: Path

    @property
    def marker(self) -> Path:
        return self.tmp / "pwned"

    def touch(self) -> str:
        return f"touch {self.marker}"


Attack = Callable[[Ctx], Callable[[dict[str, Any]], Any]]


def _kw(key: str, node: Any, **more: Any) -> Attack:
    """Set ``policy_kwargs[key]`` (and more entries) to forged nodes."""

    def attack(ctx: Ctx) -> Callable[[dict[str, Any]], Any]:
        def edit(m: dict[str, Any]) -> None:
            items = m["data"]["policy_kwargs"]["items"]
            items[key] = node(ctx) if callable(node) else node
            for k, v in more.items():
                items[k] = v(ctx) if callable(v) else v

        return edit

    return attack


def _ref(ref: str) -> dict[str, str]:
    return {"kind": "ref", "ref": ref}


def _spec(factory: str, kwargs: Callable[[Ctx], dict[str, Any]], **extra: Any) -> Attack:
    """A placeholder at a new data attribute whose spec names ``factory`` (no resources= at load)."""

    def attack(ctx: Ctx) -> Callable[[dict[str, Any]], Any]:
        def edit(m: dict[str, Any]) -> None:
            spec = {"factory": factory, "kwargs": kwargs(ctx), "lazy": extra.pop("lazy", False)}
            with_placeholder(m, "expert", placeholder("expert", ["expert"], spec=spec, **extra))

        return edit

    return attack


def _data(key: str, node: Any) -> Attack:
    def attack(ctx: Ctx) -> Callable[[dict[str, Any]], Any]:
        def edit(m: dict[str, Any]) -> None:
            m["data"][key] = node(ctx) if callable(node) else node

        return edit

    return attack


def _rebind(path: str) -> Attack:
    """An optional placeholder at a module-attribute path: load binds an ``Unbound`` stand-in there."""

    def attack(ctx: Ctx) -> Callable[[dict[str, Any]], Any]:
        def edit(m: dict[str, Any]) -> None:
            m["placeholders"].append(placeholder("x", [path], optional=True))

        return edit

    return attack


def _top(field: str, value: str, then: Attack | None = None) -> Attack:
    def attack(ctx: Ctx) -> Callable[[dict[str, Any]], Any]:
        def edit(m: dict[str, Any]) -> None:
            m[field] = value
            if then is not None:
                then(ctx)(m)

        return edit

    return attack


ATTACKS: dict[str, Attack] = {
    # 1. a reference resolves only to what is defined where it says: no chains through modules
    "ref os.system through the loading class's module": _kw("activation_fn", _ref(SYSTEM)),
    "ref Popen through th._strobelight as features_extractor_class": _kw(
        "features_extractor_class", _ref(POPEN), features_extractor_kwargs=lambda c: {"kind": "dict", "items": {}}
    ),
    "ref re-exported torch class through a module chain": _kw(
        "activation_fn", _ref("stable_baselines3.common.utils:th.nn.ReLU")
    ),
    "ref a module object": _kw("activation_fn", _ref("stable_baselines3.common.utils:th")),
    "ref torch.os through torch.optim.adam": _kw("activation_fn", _ref("torch.optim.adam:torch.os.getcwd")),
    "ref a method through its class": _kw("optimizer_class", _ref("torch.optim.adam:Adam.step")),
    "ref a canary module": _kw("activation_fn", lambda c: _ref(c.canary.ref)),
    # 2. typed slots: a default-trusted class in the wrong slot
    "ResultsWriter as activation_fn (writes monitor.csv)": _kw(
        "activation_fn", _ref("stable_baselines3.common.monitor:ResultsWriter")
    ),
    "HumanOutputFormat as features_extractor_class": _kw(
        "features_extractor_class",
        _ref("stable_baselines3.common.logger:HumanOutputFormat"),
        features_extractor_kwargs=lambda c: {"kind": "dict", "items": {"max_length": 3}},
    ),
    "Adam as activation_fn": _kw("activation_fn", _ref("torch.optim.adam:Adam")),
    "ReLU as optimizer_class": _kw("optimizer_class", _ref("torch.nn.modules.activation:ReLU")),
    "ReplayBuffer as rollout_buffer_class": _data(
        "rollout_buffer_class", _ref("stable_baselines3.common.buffers:ReplayBuffer")
    ),
    "Logger object as lr_schedule": _data(
        "lr_schedule", {"kind": "object", "cls": "stable_baselines3.common.logger:Logger", "state": {}}
    ),
    "policy as a features extractor": _kw(
        "features_extractor_class", _ref("stable_baselines3.common.policies:ActorCriticPolicy")
    ),
    # 3. a factory named in a file is never called unless the caller trusted it
    "factory os.system through the loading class's module": _spec(SYSTEM, lambda c: {"command": c.touch()}),
    "factory Popen through th._strobelight": _spec(POPEN, lambda c: {"args": ["touch", str(c.marker)]}),
    "factory HumanOutputFormat truncates a file": _spec(
        "stable_baselines3.common.logger:HumanOutputFormat", lambda c: {"filename_or_textio": str(c.victim)}
    ),
    "factory ResultsWriter writes a file": _spec(
        "stable_baselines3.common.monitor:ResultsWriter", lambda c: {"filename": str(c.marker)}
    ),
    "factory: the loading class itself, with a canary env": _spec(
        "stable_baselines3.ppo.ppo:PPO", lambda c: {"policy": "MlpPolicy", "env": f"{c.canary.module}:Thing-v0"}
    ),
    "factory from a canary module": _spec("x:y", lambda c: {}),  # replaced below with the canary ref
    # 4. data keys: only what SB3's save could have written
    "env string imports a module through gym.make": _data("env", lambda c: f"{c.canary.module}:Thing-v0"),
    "env string of an unknown env": _data("env", "NoSuchEnvAnywhere-v0"),
    "device key": _data("device", {"kind": "device", "value": "cpu"}),
    "replay_buffer key": _data("replay_buffer", None),
    "rollout_buffer key": _data("rollout_buffer", None),
    "policy key": _data("policy", None),
    "_logger key": _data("_logger", {"kind": "object", "cls": "stable_baselines3.common.logger:Logger", "state": {}}),
    "_custom_logger key": _data("_custom_logger", True),
    "_vec_normalize_env key": _data("_vec_normalize_env", None),
    "method key": _data("learn", None),
    "property key": _data("logger", None),
    "class attribute key": _data("policy_aliases", {"kind": "dict", "items": {}}),
    # 5. rebinding writes only instance attributes of the model's own objects
    "rebind Adam.step through optimizer_class": _rebind("policy.optimizer_class.step"),
    "rebind Tanh.forward through activation_fn": _rebind("policy.activation_fn.forward"),
    "rebind a class through features_extractor_class": _rebind("policy.features_extractor_class.forward"),
    "rebind a bound method of the optimizer": _rebind("policy.optimizer.step"),
    "rebind a module's forward": _rebind("policy.action_net.forward"),
    "rebind a property": _rebind("policy.squash_output"),
    "rebind a space's method": _rebind("policy.observation_space.sample"),
    "rebind a stand-in over a child module": _rebind("policy.mlp_extractor"),
    "rebind over the whole policy": _rebind("policy"),
    "rebind over a loaded weight": _rebind("policy.action_net.weight"),
    "rebind over the optimizer": _rebind("policy.optimizer"),
    # 9. audit must make load's decisions, not trust what the file says about itself
    "algorithm builtins:PPO with a builtins ref": _top(
        "algorithm", "builtins:PPO", _kw("activation_fn", _ref("builtins:ReferenceError"))
    ),
    "algorithm in a canary module with a canary ref": lambda c: _top(
        "algorithm", f"{c.canary.module}:PPO", _kw("activation_fn", _ref(c.canary.ref))
    )(c),
}


AUDITED = list(ATTACKS)


def _forged(name: str, ctx: Ctx) -> bytes:
    attack = ATTACKS[name]
    if name == "factory from a canary module":
        attack = _spec(ctx.canary.ref, lambda c: {})
    return forge(base(), attack(ctx))


@pytest.fixture
def ctx(tmp_path: Path, canary: Canary, victim: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # ResultsWriter() and friends write into the working directory
    return Ctx(tmp_path, canary, victim)


@pytest.fixture
def popen_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and stop) any ``subprocess.Popen`` construction during the test."""
    calls: list[Any] = []
    original = subprocess.Popen.__init__

    def record(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise RuntimeError("Popen blocked by the test")

    monkeypatch.setattr(subprocess.Popen, "__init__", record)
    assert subprocess.Popen.__init__ is not original
    return calls


def _check_no_side_effects(ctx: Ctx) -> None:
    assert not ctx.marker.exists(), "the attack ran a command"
    assert not list(ctx.tmp.glob("pwned*")), "the attack wrote a file"
    assert ctx.victim.read_text() == "precious\n", "the attack truncated an unrelated file"
    assert list((ctx.tmp / "cwd").iterdir()) == [], "the attack wrote into the working directory"
    ctx.canary.assert_untouched()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_plain_load_refuses(name: str, ctx: Ctx, popen_calls: list[Any]) -> None:
    adam_step = th.optim.Adam.step
    path = write(ctx.tmp, _forged(name, ctx))
    refused(lambda: safe(PPO).load(path), ctx.canary)
    _check_no_side_effects(ctx)
    assert popen_calls == [], "subprocess.Popen was constructed"
    assert th.optim.Adam.step is adam_step


@pytest.mark.parametrize("name", AUDITED)
def test_audit_does_not_call_it_ok(name: str, ctx: Ctx) -> None:
    path = write(ctx.tmp, _forged(name, ctx))
    try:
        report = audit(path, fail_on="warning")
    except SafeSaveError:
        pass
    else:
        assert not report.ok, f"audit calls a file OK that load refuses:\n{report.table()}"
    _check_no_side_effects(ctx)


def test_cli_audit_fails_every_forged_file(tmp_path: Path, canary: Canary, victim: Path) -> None:
    """One ``sb3-safe-save audit --fail-on warning`` over all forged files: none is OK, exit status 1 or 2."""
    ctx = Ctx(tmp_path, canary, victim)
    (tmp_path / "cwd").mkdir()
    paths = [write(tmp_path, _forged(name, ctx), f"attack{i}.safetensors") for i, name in enumerate(AUDITED)]
    done = run_cli("audit", *map(str, paths), "--fail-on", "warning", "--format", "json", cwd=tmp_path / "cwd")
    assert done.returncode in (1, 2), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is False
    names = dict(zip(map(str, paths), AUDITED, strict=True))
    ok = [names.get(r["source"], r["source"]) for r in doc["reports"] if r["ok"]]
    assert ok == [], f"the CLI calls these forged files OK: {ok}"
    _check_no_side_effects(ctx)


# ------------------------------------------------------------------- optional or lazy: inert at most
@pytest.mark.parametrize("flags", [{"optional": True}, {"lazy": True}, {"optional": True, "lazy": True}])
@pytest.mark.parametrize(
    "factory", [SYSTEM, "stable_baselines3.common.logger:HumanOutputFormat", "stable_baselines3.ppo.ppo:PPO"]
)
def test_untrusted_factory_never_runs_even_when_optional_or_lazy(
    ctx: Ctx, popen_calls: list[Any], factory: str, flags: dict[str, bool]
) -> None:
    """Load may refuse, or bind a stand-in; using the stand-in must raise, never run the factory."""
    kwargs = {
        SYSTEM: {"command": ctx.touch()},
        "stable_baselines3.common.logger:HumanOutputFormat": {"filename_or_textio": str(ctx.victim)},
        "stable_baselines3.ppo.ppo:PPO": {"policy": "MlpPolicy", "env": f"{ctx.canary.module}:Thing-v0"},
    }[factory]
    path = write(ctx.tmp, forge(base(), _spec(factory, lambda c: kwargs, **flags)(ctx)))
    try:
        model = safe(PPO).load(path)
    except SafeSaveError:
        pass
    else:
        stand_in = model.expert
        with pytest.raises(SafeSaveError):
            stand_in.anything  # noqa: B018 - first use of the stand-in
        with pytest.raises(SafeSaveError):
            stand_in()
        assert not isinstance(stand_in, (PPO, th.nn.Module)), "the factory was called"
    _check_no_side_effects(ctx)
    assert popen_calls == []
