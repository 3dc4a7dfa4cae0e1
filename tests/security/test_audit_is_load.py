"""Audit is load's own phases 1-2 (issue 22, point 3): a file ``load`` refuses from its header is never OK for audit.

``_persist.decide`` makes every refusal the header and manifest decide; ``load`` and ``load_policy`` raise
the first one before anything is built, ``audit`` reports each. Each attack starts from a real saved PPO
and rewrites its manifest and tensors as an attacker would (every checksum recomputed). Checked, for each
forged file: ``safe(PPO).load`` refuses it without building a model; ``audit(path, fail_on="warning")`` is
not OK; ``sb3-safe-save audit --fail-on warning`` exits non-zero. The property test draws combinations of
forgeries and harmless edits and asserts: if ``load`` refuses, it refused before building, and audit and
the CLI do not call the file OK; if ``load`` accepts, audit does too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3 import PPO

from _attack import base, forge, placeholder, refused, with_placeholder, write
from sb3_safe_save import (
    AlgorithmMismatchError,
    FormatError,
    PickleRefusedError,
    SafeSaveError,
    StateMismatchError,
    UntrustedTypeError,
    _persist,
    audit,
    read_manifest,
    safe,
)
from sb3_safe_save._cli import main as cli_main
from sb3_safe_save._trust import TrustList

Edit = Callable[[dict[str, Any]], None]
TensorEdit = Callable[[dict[str, th.Tensor]], None]


def _noise_with_method_key(m: dict[str, Any]) -> None:
    """An action noise whose state sets ``reset``, a method of the class."""
    m["data"]["action_noise"] = {
        "kind": "object",
        "cls": "stable_baselines3.common.noise:NormalActionNoise",
        "state": {"reset": 1.0},
    }


def _meta_device(m: dict[str, Any]) -> None:
    m["data"]["rollout_buffer_kwargs"]["items"]["device"] = {"kind": "device", "value": "meta"}


def _foreign_torch_variable(m: dict[str, Any]) -> None:
    m["torch_variables"]["log_ent_coef"] = {"kind": "tensor", "tensor": "log_ent_coef", "requires_grad": False}


def _add_tensor(key: str, value: th.Tensor) -> TensorEdit:
    def edit(tensors: dict[str, th.Tensor]) -> None:
        tensors[key] = value

    return edit


def _extra_state_dict(m: dict[str, Any]) -> None:
    m["state_dicts"].append({"kind": "module", "name": "value_net_copy", "keys": []})


def _prefix_without_placeholder(m: dict[str, Any]) -> None:
    m["state_dicts"][0]["external_prefixes"] = ["expert."]


def _gsde_without_gsde(m: dict[str, Any]) -> None:
    m["random_state"]["gsde"] = {"policy": ["exploration_mat"]}


def _content_policy(m: dict[str, Any]) -> None:
    m["content"] = "policy"


def _optimizer_for_missing_attribute(m: dict[str, Any]) -> None:
    state = {"kind": "dict", "items": {"state": {"kind": "dict", "items": {}}, "param_groups": {"kind": "list", "items": []}}}
    m["state_dicts"].append({"kind": "optimizer", "name": "policy.expert_optimizer", "state": state})


#: The nine forgeries load refused while audit called them OK: name -> (manifest edit, tensor edit,
#: the error load raises, the audit finding's code).
NINE: dict[str, tuple[Edit | None, TensorEdit | None, type[SafeSaveError], str]] = {
    "object state key shadowing a method": (_noise_with_method_key, None, FormatError, "refused_attribute"),
    "stored meta device": (_meta_device, None, FormatError, "refused_attribute"),
    "foreign torch variable": (
        _foreign_torch_variable,
        _add_tensor("log_ent_coef", th.zeros(1)),
        StateMismatchError,
        "malformed",
    ),
    "extra state dict": (_extra_state_dict, None, StateMismatchError, "malformed"),
    "external prefix without a placeholder": (_prefix_without_placeholder, None, FormatError, "malformed"),
    "gSDE random state without gSDE": (
        _gsde_without_gsde,
        _add_tensor("rng/gsde/policy/exploration_mat", th.zeros(64, 2)),
        StateMismatchError,
        "malformed",
    ),
    "unused tensor": (None, _add_tensor("stray", th.ones(3)), FormatError, "malformed"),
    "content: policy file given as an agent": (_content_policy, None, FormatError, "content"),
    "optimizer entry for a missing attribute": (_optimizer_for_missing_attribute, None, StateMismatchError, "malformed"),
}


def _forged(name: str) -> bytes:
    edit, tensors, _, _ = NINE[name]
    return forge(base(), edit, tensors)


@contextlib.contextmanager
def _builds() -> Iterator[list[str]]:
    """Record every model build a load starts (``_persist._build``)."""
    calls: list[str] = []
    original = _persist._build

    def build(*args: Any, **kwargs: Any) -> Any:
        calls.append("built")
        return original(*args, **kwargs)

    _persist._build = build  # type: ignore[assignment]
    try:
        yield calls
    finally:
        _persist._build = original  # type: ignore[assignment]


def _cli_status(*paths: Path) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli_main(["audit", *map(str, paths), "--fail-on", "warning"])


@pytest.mark.parametrize("name", list(NINE))
def test_load_refuses_before_building(name: str, tmp_path: Path) -> None:
    path = write(tmp_path, _forged(name))
    _, _, error_type, _ = NINE[name]
    with _builds() as calls:
        error = refused(lambda: safe(PPO).load(path))
    assert type(error) is error_type, f"{type(error).__name__}: {error}"
    assert calls == [], "load built a model before refusing a file its header already condemns"
    decisions = _persist.decide(read_manifest(path), safe(PPO), TrustList(None, home=safe(PPO)))
    assert decisions and str(decisions[0].error) == str(error)  # the load raised decide's first decision


@pytest.mark.parametrize("name", list(NINE))
def test_audit_reports_what_load_refuses(name: str, tmp_path: Path) -> None:
    path = write(tmp_path, _forged(name))
    _, _, _, code = NINE[name]
    report = audit(path, fail_on="warning")
    assert not report.ok, report.table()
    assert code in {f.code for f in report.failing()}, report.table()
    if code != "content":  # a policy file is a warning: load_policy loads it
        assert not audit(path).ok, "the default audit (fail_on='error') calls it OK"


def test_cli_audit_fails_every_one_of_the_nine(tmp_path: Path) -> None:
    paths = [write(tmp_path, _forged(name), f"forged{i}.safetensors") for i, name in enumerate(NINE)]
    assert _cli_status(*paths) == 1
    for path in paths:
        assert _cli_status(path) == 1, path


def test_a_clean_file_is_ok_and_loads(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    assert audit(path, fail_on="warning").ok
    assert _cli_status(path) == 0
    assert _persist.decide(read_manifest(path), safe(PPO), TrustList(None, home=safe(PPO))) == []
    safe(PPO).load(path)


@pytest.mark.parametrize("ent_coef", ["auto", 0.1])
def test_sac_of_either_entropy_mode_passes_the_header_check(ent_coef: Any, tmp_path: Path) -> None:
    """SAC stores ``ent_coef_optimizer`` and ``log_ent_coef`` only with ``ent_coef='auto'``: both files pass."""
    from stable_baselines3 import SAC

    model = safe(SAC)("MlpPolicy", "Pendulum-v1", ent_coef=ent_coef, policy_kwargs={"net_arch": [8]}, buffer_size=100)
    model.save(tmp_path / "sac")
    manifest = read_manifest(tmp_path / "sac.safetensors")
    assert ("ent_coef_optimizer" in {e.name for e in manifest.state_dicts}) == (ent_coef == "auto")
    assert _persist.decide(manifest, safe(SAC), TrustList(None, home=safe(SAC))) == []
    assert audit(tmp_path / "sac.safetensors", fail_on="warning").ok
    safe(SAC).load(tmp_path / "sac.safetensors")
    required, possible = _persist.torch_save_names(SAC) or ((set(), set()), (set(), set()))
    assert required == (
        {"policy", "actor.optimizer", "critic.optimizer"},
        {"policy", "actor.optimizer", "critic.optimizer", "ent_coef_optimizer"},
    )
    assert possible == (set(), {"log_ent_coef", "ent_coef_tensor"})


# ----------------------------------------------------------------------------------- the property
def _set(path: list[str], value: Any) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        target = m
        for key in path[:-1]:
            target = target.get(key, {})  # a combined edit may have removed it
        target[path[-1]] = copy.deepcopy(value)

    return edit


def _delete(path: list[str]) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        target = m
        for key in path[:-1]:
            target = target.get(key, {})
        target.pop(path[-1], None)

    return edit


def _activation(ref: str) -> Edit:
    return _set(["data", "policy_kwargs", "items", "activation_fn"], {"kind": "ref", "ref": ref})


RB_DEVICE = ["data", "rollout_buffer_kwargs", "items", "device"]


def _optional_expert(m: dict[str, Any]) -> None:
    with_placeholder(m, "expert", placeholder("expert", ["expert"], optional=True))


def _rebind_over_weight(m: dict[str, Any]) -> None:
    m["placeholders"].append(placeholder("w", ["policy.action_net.weight"], optional=True))


def _duplicate_state_dict(m: dict[str, Any]) -> None:
    m["state_dicts"].append(copy.deepcopy(m["state_dicts"][0]))


def _drop_optimizer(m: dict[str, Any]) -> None:
    m["state_dicts"] = [e for e in m["state_dicts"] if e["kind"] != "optimizer"]


def _alias_to_nothing(m: dict[str, Any]) -> None:
    m["state_dicts"][0]["aliases"] = {"action_net.weight": "no_such_key"}


def _missing_tensor(m: dict[str, Any]) -> None:
    m["data"]["_last_obs"] = {"kind": "ndarray", "tensor": "no_such_tensor", "dtype": "<f4", "shape": [1, 4]}


def _gsde_of_rank_1(m: dict[str, Any]) -> None:
    m["data"]["use_sde"] = True
    m["random_state"]["gsde"] = {"policy": ["exploration_matrices"]}


def _pickle(m: dict[str, Any]) -> None:
    m["data"]["action_noise"] = {"kind": "pickle", "tensor": "action_noise#pickle", "type": "builtins.object"}


#: name -> (manifest edit, tensor edit, whether load accepts the file with only this edit)
MUTATIONS: dict[str, tuple[Edit | None, TensorEdit | None, bool]] = {
    **{name: (edit, tensors, False) for name, (edit, tensors, _, _) in NINE.items()},
    # harmless: load accepts these
    "gamma": (_set(["data", "gamma"], 0.95), None, True),
    "verbose": (_set(["data", "verbose"], 0), None, True),
    "an optional placeholder at a new attribute": (_optional_expert, None, True),
    "a schedule at a known class": (_set(["data", "clip_range", "state", "value_schedule", "state", "val"], 0.1), None, True),
    # more forgeries the header decides
    "env data key": (_set(["data", "env"], "CartPole-v1"), None, False),
    "untrusted reference": (
        _activation("builtins:print"),
        None,
        False,
    ),
    "refused reference": (
        _activation("torch.optim.adam:Adam"),
        None,
        False,
    ),
    "dunder object state key": (_set(["data", "lr_schedule", "state", "__call__"], 1), None, False),
    "rebind over a loaded weight": (_rebind_over_weight, None, False),
    "a state dict twice": (_duplicate_state_dict, None, False),
    "no optimizer state dict": (_drop_optimizer, None, False),
    "alias of an unstored key": (_alias_to_nothing, None, False),
    "a tensor the file lacks": (_missing_tensor, None, False),
    "numpy key of the wrong size": (None, _add_tensor("rng/numpy_key", th.zeros(100, dtype=th.uint8)), False),
    "gSDE noise of rank 1": (_gsde_of_rank_1, _add_tensor("rng/gsde/policy/exploration_matrices", th.zeros(64)), False),
    "a pickle": (_pickle, _add_tensor("action_noise#pickle", th.zeros(4, dtype=th.uint8)), False),
    "no policy_kwargs": (_delete(["data", "policy_kwargs"]), None, False),
    "no observation_space": (_delete(["data", "observation_space"]), None, False),
    "policy_class as a string": (
        _set(["data", "policy_class"], "stable_baselines3.common.policies:ActorCriticPolicy"),
        None,
        False,
    ),
    "action_space as a list": (_set(["data", "action_space"], {"kind": "list", "items": [2]}), None, False),
    "an undescribed placeholder": (_set(["data", "stranger"], {"kind": "placeholder", "key": "nobody"}), None, False),
    "cuda:x device": (
        _set(["data", "rollout_buffer_kwargs", "items", "device"], {"kind": "device", "value": "cuda:x"}),
        None,
        False,
    ),
}

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(names=st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=0, max_size=3, unique=True))
def test_if_load_refuses_audit_is_not_ok(names: list[str], tmp_path: Path) -> None:
    edits = [MUTATIONS[n][0] for n in names]
    tensor_edits = [MUTATIONS[n][1] for n in names]

    def edit(m: dict[str, Any]) -> None:
        for e in edits:
            if e is not None:
                e(m)

    def tensors(found: dict[str, th.Tensor]) -> None:
        for e in tensor_edits:
            if e is not None:
                e(found)

    path = write(tmp_path, forge(base(), edit, tensors), "property.safetensors")
    with _builds() as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            safe(PPO).load(path)
        except SafeSaveError:  # anything else escapes and fails the test
            accepted = False
        else:
            accepted = True
    report = audit(path, fail_on="warning")
    if accepted:
        assert all(MUTATIONS[n][2] for n in names), f"load accepted {names}"
        assert report.ok, f"audit fails a file that load accepts ({names}):\n{report.table()}"
    else:
        assert not all(MUTATIONS[n][2] for n in names), f"load refused the harmless edits {names}"
        assert calls == [], f"load refused {names} only after building a model"
        assert not report.ok, f"audit calls OK a file that load refuses ({names}):\n{report.table()}"
        assert _cli_status(path) != 0


def test_load_policy_refuses_from_the_header_too(tmp_path: Path) -> None:
    """``load_policy`` runs ``decide`` on its view: an external prefix without a placeholder is refused there too."""
    from sb3_safe_save import load_policy

    path = write(tmp_path, forge(base(), _prefix_without_placeholder))
    error = refused(lambda: load_policy(path))
    assert isinstance(error, FormatError) and "records no resource at policy.expert" in str(error)


@pytest.mark.parametrize(
    ("edit", "error_type"),
    [
        (
            _activation("builtins:print"),
            UntrustedTypeError,
        ),
        (_set(["base_algorithm"], "stable_baselines3.dqn.dqn:DQN"), AlgorithmMismatchError),
    ],
)
def test_load_raises_the_first_decision_as_before(edit: Edit, error_type: type[SafeSaveError], tmp_path: Path) -> None:
    path = write(tmp_path, forge(base(), edit))
    assert type(refused(lambda: safe(PPO).load(path))) is error_type
    assert not audit(path, fail_on="warning", algo=safe(PPO)).ok  # audited as the class load was called on


def test_pickles_are_refused_in_phase_2(tmp_path: Path) -> None:
    edit, tensors, _ = MUTATIONS["a pickle"]
    path = write(tmp_path, forge(base(), edit, tensors))
    with _builds() as calls:
        assert type(refused(lambda: safe(PPO).load(path))) is PickleRefusedError
    assert calls == []


class _StateDependentPPO(PPO):
    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer", *self.extra_state_dicts], []


class _ExpertOptimizerPPO(PPO):
    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        names, variables = super()._get_torch_save_params()
        return [*names, "expert_optimizer"], variables


def test_state_dict_names_are_probed_only_where_a_bare_class_tells_them() -> None:
    """A method that reads the built model's state cannot be told from the class: phase 3 checks it then."""
    assert _persist.torch_save_names(_StateDependentPPO) is None
    names = _persist.torch_save_names(_ExpertOptimizerPPO)
    assert names is not None and names[0][0] == names[0][1] == {"policy", "policy.optimizer", "expert_optimizer"}


def test_a_policy_file_is_a_warning_for_load_and_checked_as_load_policy_reads_it(tmp_path: Path) -> None:
    from sb3_safe_save import load_policy, save_policy

    model = safe(PPO)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]})
    save_policy(model.policy, tmp_path / "policy")
    path = tmp_path / "policy.safetensors"
    report = audit(path)
    assert report.ok and [f.code for f in report.findings if f.severity != "info"] == ["content"]
    assert not audit(path, fail_on="warning").ok
    load_policy(path)
    forged = write(tmp_path, forge(path.read_bytes(), _prefix_without_placeholder), "forged_policy.safetensors")
    assert {f.code for f in audit(forged).failing()} == {"malformed"}  # load_policy's own refusal, found by audit
    with pytest.raises(FormatError, match=r"records no resource at policy\.expert"):
        load_policy(forged)
