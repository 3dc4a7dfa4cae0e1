"""The trust rules (``_trust.py``), one at a time: what a reference may name, who trusts it, where it may sit.

The attacks of issue 10 are replayed through a real ``load`` with forged manifests (``_hostile``):
each asserts that nothing ran (no marker file, the module not imported) and that the error is a
``SafeSaveError`` naming the path.
"""

from __future__ import annotations

import io
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch as th
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common import utils as sb3_utils
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import HumanOutputFormat
from stable_baselines3.common.policies import BasePolicy

from _hostile import edit_manifest, saved_bytes
from lang_dqn import CustomDQNPolicy, build_expert
from sb3_safe_save import FormatError, SafeSaveError, SafeSaveMixin, UntrustedTypeError, audit, safe, trust
from sb3_safe_save._trust import _MISSING, TrustList, _registered, default_trusted, lookup, ref_of, slots


@pytest.fixture
def canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path whose import leaves a marker file; it defines a class and a function."""
    name = f"sb3ss_trust_canary_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"import os, pathlib\npathlib.Path({str(marker)!r}).touch()\n\n"
        "class Thing:\n    pass\n\n\ndef run(**kwargs):\n    pathlib.Path(kwargs['path']).touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


@pytest.fixture
def clean_registry() -> Any:
    before = set(_registered)
    yield
    _registered.clear()
    _registered.update(before)


def _forge(algo: str, edit: Any) -> bytes:
    return edit_manifest(saved_bytes(algo), edit)


def _set_ref(where: str, ref: str, kind: str = "ref") -> Any:
    node: dict[str, Any] = {"kind": kind, "ref": ref} if kind == "ref" else {"kind": kind, "cls": ref, "state": {}}

    def edit(m: dict[str, Any]) -> None:
        if where.startswith("policy_kwargs."):
            m["data"]["policy_kwargs"]["items"][where.partition(".")[2]] = node
        else:
            m["data"][where] = node

    return edit


# ------------------------------------------------------------------ 1. a reference names what is defined there
@pytest.mark.parametrize(
    "ref",
    [
        "stable_baselines3.ppo.ppo:th.os.system",  # through a module the file's module imported
        "stable_baselines3.common.utils:th.os.system",
        "stable_baselines3:PPO",  # a re-export: PPO is defined in stable_baselines3.ppo.ppo
        "lang_dqn:DQN",  # imported into lang_dqn, not defined there
        "lang_dqn:CustomDQNPolicy.__init__.__globals__",  # never through a function
        "lang_dqn:CustomDQNPolicy.mro",  # a method of type, not in the class's own __dict__
    ],
)
def test_references_resolve_only_to_what_is_defined_there(ref: str) -> None:
    module, _, qualname = ref.partition(":")
    __import__(module)
    assert lookup(sys.modules[module], qualname) is _MISSING
    with pytest.raises(SafeSaveError):  # even when the user trusts that exact string
        TrustList([ref]).resolve(ref, "policy_kwargs.activation_fn", "ref")


def test_exact_references_resolve() -> None:
    assert lookup(sys.modules["lang_dqn"], "CustomDQNPolicy") is CustomDQNPolicy
    assert TrustList([CustomDQNPolicy]).resolve(ref_of(CustomDQNPolicy), "policy_class") is CustomDQNPolicy
    assert TrustList(None).resolve("torch.optim.adam:Adam", "policy_kwargs.optimizer_class") is th.optim.Adam


POPEN_CHAIN = "stable_baselines3.common.utils:th._strobelight.cli_function_profiler.subprocess.Popen"


@pytest.mark.parametrize("ref", ["stable_baselines3.ppo.ppo:th.os.system", POPEN_CHAIN])
def test_the_issue_chains_run_nothing(ref: str, tmp_path: Path) -> None:
    """Issue 10: a features extractor and a spec factory reached through modules a trusted module imports."""
    marker = tmp_path / "pwned"

    def extractor(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["features_extractor_class"] = {"kind": "ref", "ref": ref}

    def factory(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["features_extractor_kwargs"] = {"kind": "placeholder", "key": "x"}
        m["placeholders"] = [
            {
                "key": "x",
                "paths": ["policy_kwargs.features_extractor_kwargs"],
                "type": "builtins.dict",
                "reason": "declared",
                "spec": {"factory": ref, "kwargs": {"args": ["touch", str(marker)], "command": f"touch {marker}"}},
            }
        ]

    for edit in (extractor, factory):
        with pytest.raises(SafeSaveError):
            safe(PPO).load(io.BytesIO(_forge("PPO", edit)))
        with pytest.raises(SafeSaveError):  # even trusted by that exact string, it does not resolve
            safe(PPO).load(io.BytesIO(_forge("PPO", edit)), trusted=[ref])
    assert not marker.exists()


# ------------------------------------------------------------------------- 2. exact identities, typed slots
def test_the_default_list_is_exact_classes() -> None:
    defaults = default_trusted()
    assert "stable_baselines3.common.logger:HumanOutputFormat" not in defaults
    assert ref_of(HumanOutputFormat) not in defaults
    for ref, (cls, kinds) in defaults.items():
        assert isinstance(cls, type) and ref_of(cls) == ref, ref  # a class, under its own name
        assert "factory" not in kinds
        assert lookup(sys.modules[cls.__module__], cls.__qualname__) is cls
    for ref in (
        "stable_baselines3.dqn.policies:DQNPolicy",
        "stable_baselines3.common.torch_layers:NatureCNN",
        "stable_baselines3.common.buffers:ReplayBuffer",
        "stable_baselines3.her.her_replay_buffer:HerReplayBuffer",
        "stable_baselines3.common.noise:NormalActionNoise",
        *(["stable_baselines3.common.utils:LinearSchedule"] if hasattr(sb3_utils, "LinearSchedule") else []),  # SB3 >= 2.7
        "torch.optim.adam:Adam",
        "torch.nn.modules.activation:ReLU",
        "gymnasium.spaces.box:Box",
    ):
        assert ref in defaults, ref
    assert "stable_baselines3.common.utils:get_schedule_fn" not in defaults  # no functions
    trust_list = TrustList(None)
    assert trust_list.why("stable_baselines3.ppo.ppo:PPO", "algorithm") == "default"
    assert trust_list.why("stable_baselines3.ppo.ppo:PPO", "ref") is None  # algorithms only as the file's algorithm
    assert trust_list.why(ref_of(HumanOutputFormat), "ref") is None
    assert trust_list.why("stable_baselines3.common.buffers:ReplayBuffer", "object") is None  # not a plain object


@pytest.mark.parametrize(
    ("where", "ref"),
    [
        ("policy_class", "stable_baselines3.common.buffers:ReplayBuffer"),
        ("policy_kwargs.features_extractor_class", "torch.optim.adam:Adam"),
        ("policy_kwargs.activation_fn", "stable_baselines3.common.buffers:ReplayBuffer"),
        ("policy_kwargs.optimizer_class", "torch.nn.modules.activation:ReLU"),
        ("replay_buffer_class", "stable_baselines3.common.buffers:RolloutBuffer"),
    ],
)
def test_default_classes_in_the_wrong_slot_are_refused_before_anything_is_called(where: str, ref: str) -> None:
    with pytest.raises(FormatError, match=where.rpartition(".")[2]):
        safe(DQN).load(io.BytesIO(_forge("DQN", _set_ref(where, ref))))


def test_user_trusted_classes_are_checked_against_their_slot(canary: tuple[str, Path]) -> None:
    module, marker = canary
    ref = f"{module}:Thing"
    data = _forge("DQN", _set_ref("policy_kwargs.optimizer_class", ref))
    with pytest.raises(FormatError, match=r"optimizer_class must be a class derived from torch\.optim"):
        safe(DQN).load(io.BytesIO(data), trusted=[ref])
    assert marker.exists()  # imported: the user trusted it; but never called in a slot it does not fit


def test_slots_name_sb3_base_classes() -> None:
    table = slots()
    assert table["policy_class"] is BasePolicy and table["replay_buffer_class"] is ReplayBuffer
    assert table["optimizer_class"] is th.optim.Optimizer and table["activation_fn"] is th.nn.Module


def test_plain_objects_only_of_plain_trusted_classes() -> None:
    ref = "stable_baselines3.common.buffers:ReplayBuffer"  # a default class, but not a plain object class
    with pytest.raises(UntrustedTypeError):
        safe(DQN).load(io.BytesIO(_forge("DQN", _set_ref("exploration_schedule", ref, kind="object"))))
    noise = "stable_baselines3.common.utils:LinearSchedule"  # a plain class, but not an ActionNoise
    with pytest.raises(FormatError, match="action_noise"):
        safe(DQN).load(io.BytesIO(_forge("DQN", _set_ref("action_noise", noise, kind="object"))))


# ----------------------------------------------------------------------------- the loading class's module
def test_home_module_trusts_its_classes_not_its_functions_or_imports() -> None:
    from lang_dqn import CustomDQN

    home = TrustList(None, CustomDQN)
    assert home.why("lang_dqn:CustomDQNPolicy") == "home"
    assert home.resolve("lang_dqn:CustomDQNPolicy", "policy_class") is CustomDQNPolicy
    with pytest.raises(UntrustedTypeError):  # a function defined there: not by the home rule
        TrustList(None, type("Other", (SafeSaveMixin, DQN), {"__module__": "lang_dqn"})).resolve(
            "lang_dqn:make_model", "x", "ref"
        )
    with pytest.raises(FormatError, match="not name a class or function defined in lang_dqn"):
        home.resolve("lang_dqn:th", "policy_kwargs.activation_fn")
    assert home.why("lang_dqn:make_model", "factory") is None  # home never covers a factory


def test_the_file_never_vouches_for_itself(canary: tuple[str, Path]) -> None:
    """``algorithm`` in the manifest is the file's own word: neither load nor audit trusts its module."""
    module, marker = canary

    def edit(m: dict[str, Any]) -> None:
        m["algorithm"] = f"{module}:DQN"
        m["data"]["policy_kwargs"]["items"]["activation_fn"] = {"kind": "ref", "ref": f"{module}:Thing"}

    data = _forge("DQN", edit)
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(io.BytesIO(data))
    assert info.value.refs == [f"{module}:Thing"]
    path = Path(marker.parent / "forged.safetensors")
    path.write_bytes(data)
    report = audit(path)
    assert [f.type for f in report.findings if f.code == "untrusted_reference"] == [f"{module}:Thing"]
    assert not audit(path, fail_on="warning").ok
    assert module not in sys.modules and not marker.exists()


# ------------------------------------------------------------------------------------------ 3. factories
def test_factories_need_an_exact_trusted_reference(clean_registry: None) -> None:
    ref = "lang_dqn:build_expert"
    assert TrustList(None).why(ref, "factory") is None
    assert TrustList(["lang_dqn.*"]).why(ref, "factory") is None  # a glob is not an exact reference
    assert TrustList([ref]).why(ref, "factory") == "explicit"
    assert TrustList([build_expert]).why(ref, "factory") == "explicit"
    assert TrustList(None, safe(DQN, trusted=[build_expert])).why(ref, "factory") == "declared"
    trust(build_expert)
    assert TrustList(None).why(ref, "factory") == "explicit"
    logger = ref_of(HumanOutputFormat)
    assert TrustList(None).why(logger, "factory") is None  # issue 10: SB3's own logger as a "factory"


# --------------------------------------------------------------------------- issue 11.2: safe_save_trusted
def test_safe_with_trusted_makes_a_cached_declaring_subclass() -> None:
    a = safe(DQN, trusted=[CustomDQNPolicy])
    assert a is safe(DQN, trusted=[CustomDQNPolicy]) and a is not safe(DQN)
    assert issubclass(a, DQN) and issubclass(a, SafeSaveMixin) and a.__name__ == a.__qualname__ == "SafeDQN"
    assert a.__module__ == __name__  # the caller's module: its classes are trusted by a.load, as for a subclass
    assert tuple(a.safe_save_trusted) == (CustomDQNPolicy,)
    with pytest.raises(TypeError, match="list"):
        safe(DQN, trusted=CustomDQNPolicy)  # type: ignore[arg-type]


def test_a_policy_from_another_module_loads_when_declared(tmp_path: Path) -> None:
    model = safe(DQN)(CustomDQNPolicy, "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=100)
    path = tmp_path / "m.safetensors"
    model.save(path)
    with pytest.raises(UntrustedTypeError) as info:
        safe(DQN).load(path)
    message = str(info.value)
    assert "lang_dqn:CustomDQNPolicy" in message and "policy_class" in message
    assert "safe(DQN, trusted=[CustomDQNPolicy])" in message  # says exactly what to write

    class MyDQN(SafeSaveMixin, DQN):
        safe_save_trusted = (CustomDQNPolicy,)

    with pytest.raises(UntrustedTypeError, match=r"class MyDQN\(SafeSaveMixin, DQN\):\n\s+safe_save_trusted = "):
        type("MyDQN", (SafeSaveMixin, DQN), {}).load(path)
    assert type(MyDQN.load(path).policy) is CustomDQNPolicy
    assert type(safe(DQN, trusted=[CustomDQNPolicy]).load(path).policy) is CustomDQNPolicy
    assert "untrusted_reference" not in {f.code for f in audit(path, algo=MyDQN).findings}


# ------------------------------------------------------------------------------------------ 4. data keys
@pytest.mark.parametrize(
    ("key", "node"),
    [
        ("env", "CartPole-v1"),  # SB3 passes a stored env string to gym.make, which imports modules
        ("device", {"kind": "device", "value": "meta"}),
        ("policy", None),
        ("replay_buffer", None),
        ("_logger", None),
        ("predict", 1),  # a method
        ("device_property_of_class", None),
        ("policy_aliases", {"kind": "dict", "items": {}}),  # a class-level table
    ],
)
def test_a_file_sets_only_what_save_could_have_written(key: str, node: Any) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["data"][key] = node

    if key == "device_property_of_class":
        key = "logger"  # BaseAlgorithm.logger is a property

        def edit(m: dict[str, Any]) -> None:
            m["data"]["logger"] = None

    with pytest.raises(FormatError, match=repr(key)):
        safe(DQN).load(io.BytesIO(_forge("DQN", edit)))


def test_env_string_imports_nothing(canary: tuple[str, Path]) -> None:
    module, marker = canary

    def edit(m: dict[str, Any]) -> None:
        m["data"]["env"] = f"{module}:Thing"

    with pytest.raises(FormatError, match="'env'"):
        safe(DQN).load(io.BytesIO(_forge("DQN", edit)))
    assert module not in sys.modules and not marker.exists()


def test_a_stored_device_is_a_real_device_and_never_the_callers() -> None:
    def edit(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["device"] = {"kind": "device", "value": "meta"}

    with pytest.raises(FormatError, match="meta"):
        safe(DQN).load(io.BytesIO(_forge("DQN", edit)))

    def edit_cpu(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["device"] = {"kind": "device", "value": "cuda"}

    loaded = safe(DQN).load(io.BytesIO(_forge("DQN", edit_cpu)), device="cpu")
    assert loaded.device == th.device("cpu") and next(loaded.policy.parameters()).device == th.device("cpu")


class Flagged(SafeSaveMixin, DQN):
    use_expert = False  # a class-level default that the instance overrides: SB3's save writes it


def test_class_level_defaults_shadowed_by_instances_still_load(tmp_path: Path) -> None:
    model = Flagged("MlpPolicy", "CartPole-v1", buffer_size=100, policy_kwargs={"net_arch": [8]})
    model.use_expert = True
    model.save(tmp_path / "m")
    assert Flagged.load(tmp_path / "m").use_expert is True


# --------------------------------------------------------------------------------------------- 5. rebinding
@pytest.fixture(scope="module")
def expert_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Any]:
    from lang_dqn import UnpicklableExpert, make_model

    expert = UnpicklableExpert(name="e")
    buf = io.BytesIO()
    make_model(expert, net_arch=[8]).save(buf)
    return buf.getvalue(), expert


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("policy.optimizer_class.step", "optimizer_class"),  # through a class: would replace Adam.step process-wide
        ("policy.optimizer.step", "'step' is a function of"),  # a method of the optimizer's class
        ("policy.device", "property"),  # a property
        ("policy.q_net.vlm_model.calls", "where a resource is bound"),  # through a bound resource (a caller object)
        ("policy.q_net.forward", "forward"),  # a method of nn.Module
        ("policy.observation_space.sample", "sample"),  # a method of a space
        ("policy.__class__.x", None),  # refused when the manifest is parsed
    ],
)
def test_rebinding_writes_only_instance_attributes_of_the_model(
    expert_file: tuple[bytes, Any], path: str, error: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from lang_dqn import CustomDQN

    data, expert = expert_file
    step, calls = th.optim.Adam.step, expert.calls

    def edit(m: dict[str, Any]) -> None:
        m["placeholders"][0]["paths"].append(path)

    forged = edit_manifest(data, edit)
    with pytest.raises(SafeSaveError, match=error):
        CustomDQN.load(io.BytesIO(forged), resources={"vlm_model": expert})
    assert th.optim.Adam.step is step and expert.calls == calls and "x" not in vars(CustomDQNPolicy)
    if error is not None:  # (a dunder path is refused when the manifest is parsed, by audit too)
        tmp = tmp_path_factory.mktemp("rebind") / "forged.safetensors"
        tmp.write_bytes(forged)
        report = audit(tmp, algo=CustomDQN, fail_on="warning")
        assert not report.ok and any(f.code == "refused_attribute" and path in f.paths for f in report.findings)


# ------------------------------------------------------------------------------- 9. audit decides as load
def test_audit_reports_what_load_refuses(tmp_path: Path, expert_file: tuple[bytes, Any]) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["algorithm"] = "builtins:PPO"  # the file's own word: never trusted
        m["data"]["env"] = "CartPole-v1"
        m["data"]["policy_class"] = {"kind": "ref", "ref": "stable_baselines3.common.buffers:ReplayBuffer"}
        m["data"]["policy_kwargs"]["items"]["activation_fn"] = {"kind": "ref", "ref": "builtins:print"}

    path = tmp_path / "forged.safetensors"
    path.write_bytes(_forge("DQN", edit))
    with pytest.raises(SafeSaveError):
        safe(DQN).load(path)
    report = audit(path)
    found = {(f.code, f.severity, f.type or f.paths[0]) for f in report.findings}
    assert ("refused_attribute", "error", "env") in found
    assert ("refused_reference", "error", "stable_baselines3.common.buffers:ReplayBuffer") in found
    assert ("untrusted_reference", "warning", "builtins:print") in found
    assert not report.ok and not audit(path, fail_on="warning").ok

    data, _ = expert_file

    def factory(m: dict[str, Any]) -> None:
        m["placeholders"][0]["spec"] = {"factory": ref_of(HumanOutputFormat), "kwargs": {"filename_or_file": "x"}}

    path.write_bytes(edit_manifest(data, factory))
    from lang_dqn import CustomDQN

    (finding,) = [f for f in audit(path, algo=CustomDQN).findings if f.code == "spec_factory"]
    assert finding.severity == "warning" and finding.type == ref_of(HumanOutputFormat)
    assert not audit(path, algo=CustomDQN, fail_on="warning").ok
    trusted = audit(path, algo=CustomDQN, trusted=[HumanOutputFormat])
    assert [f.severity for f in trusted.findings if f.code == "spec_factory"] == ["info"]


def test_no_factory_runs_when_a_resource_is_missing(expert_file: tuple[bytes, Any]) -> None:
    from lang_dqn import CustomDQN, UnpicklableExpert

    data, _ = expert_file
    calls: list[str] = []

    def edit(m: dict[str, Any]) -> None:
        extra = {**m["placeholders"][0], "key": "second", "paths": ["policy.q_net.second_expert"], "spec": None}
        m["placeholders"].append(extra)

    built = factory_of(calls, UnpicklableExpert)
    with pytest.raises(SafeSaveError, match="'second'"):
        CustomDQN.load(io.BytesIO(edit_manifest(data, edit)), resources={"vlm_model": built})
    assert calls == []  # the factory for vlm_model was found, but not called: 'second' is missing


def factory_of(calls: list[str], cls: type) -> Any:
    from sb3_safe_save import factory

    return factory(lambda ph: calls.append(ph.key) or cls())


def test_only_the_models_own_state_dicts_and_torch_variables_are_written() -> None:
    data = saved_bytes("SAC")

    def variable(m: dict[str, Any]) -> None:
        m["torch_variables"]["policy.actor.mu.bias"] = m["torch_variables"].pop("log_ent_coef")

    with pytest.raises(SafeSaveError, match=r"policy\.actor\.mu\.bias"):
        safe(SAC).load(io.BytesIO(edit_manifest(data, variable)))

    def state_dict(m: dict[str, Any]) -> None:
        entry = next(e for e in m["state_dicts"] if e["kind"] == "optimizer")
        entry["name"] = "policy.optimizer_class"

    model = safe(SAC)("MlpPolicy", "Pendulum-v1", buffer_size=100, policy_kwargs={"net_arch": [16]})
    step = th.optim.Adam.step
    with pytest.raises(SafeSaveError, match=r"policy\.optimizer_class"):
        model.set_parameters(io.BytesIO(edit_manifest(data, state_dict)), exact_match=False)
    assert th.optim.Adam.step is step


def test_a_plain_object_cannot_shadow_its_class_methods() -> None:
    def edit(m: dict[str, Any]) -> None:
        schedule = m["data"]["exploration_schedule"]
        if hasattr(sb3_utils, "LinearSchedule"):  # SB3 >= 2.7 (before: a schedule node, no class)
            assert schedule["cls"] == "stable_baselines3.common.utils:LinearSchedule"
            schedule["state"]["__call__"] = 1  # refused when parsed or decoded
        m["data"]["action_noise"] = {
            "kind": "object",
            "cls": "stable_baselines3.common.noise:NormalActionNoise",
            "state": {"reset": {"kind": "ref", "ref": "torch.nn.modules.activation:ReLU"}},
        }

    with pytest.raises(SafeSaveError):
        safe(DQN).load(io.BytesIO(_forge("DQN", edit)))

    def noise_only(m: dict[str, Any]) -> None:
        m["data"]["action_noise"] = {
            "kind": "object",
            "cls": "stable_baselines3.common.noise:NormalActionNoise",
            "state": {"reset": {"kind": "ref", "ref": "torch.nn.modules.activation:ReLU"}},
        }

    with pytest.raises(FormatError, match="'reset'"):
        safe(DQN).load(io.BytesIO(_forge("DQN", noise_only)))


def test_declared_package_trust_is_the_users_choice_but_never_for_factories() -> None:
    declaring = safe(DQN, trusted=["lang_dqn.*"])
    trust_list = TrustList(None, declaring)
    assert trust_list.why("lang_dqn:CustomDQNPolicy") == "declared"
    assert trust_list.why("lang_dqn:build_expert", "factory") is None
