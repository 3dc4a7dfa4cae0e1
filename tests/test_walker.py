"""Unit tests of the walker: what becomes a placeholder, under which key, and what is stored."""

from __future__ import annotations

import pathlib
import time
import tracemalloc
from typing import Any

import pytest
import torch as th
from stable_baselines3 import DQN

import sb3_safe_save
from _compare import assert_same_tree
from _naive import NaiveDQNPolicy, make_naive_model
from lang_dqn import CustomDQN, ModuleExpert, UnpicklableExpert, make_model
from sb3_safe_save import MissingResourceError, SafeSaveMixin, UnsupportedObjectError, safe
from sb3_safe_save._persist import snapshot_model
from sb3_safe_save._walker import DEFAULT_MAX_OBJECT_BYTES, Walker, probe_pickle


class Opaque:
    """A picklable object of a class nobody trusted: no codec stores it."""

    def __init__(self, payload: Any = None) -> None:
        self.payload = payload


def _dqn() -> DQN:
    # a class of SB3's module: safe(DQN) called here would trust the classes of this module (Opaque among them)
    return safe(DQN, module=DQN.__module__)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, device="cpu")


def _by_key(snapshot: Any) -> dict[str, Any]:
    return {p.key: p for p in snapshot.placeholders}


# ---------------------------------------------------------------------------------------- dedupe
def test_placeholder_dedupe_by_identity() -> None:
    model = _dqn()
    llm = UnpicklableExpert()
    model.cfg = {"llm": llm, "again": [llm, (llm,)]}  # type: ignore[attr-defined]
    model.llm_ref = llm  # type: ignore[attr-defined]
    snap = snapshot_model(model)
    (ph,) = snap.placeholders
    assert ph.key == "llm"
    assert ph.paths == ["cfg.llm", "cfg.again[0]", "cfg.again[1][0]", "llm_ref"]
    assert ph.reason == "unpicklable"


def test_equal_but_distinct_objects_are_distinct_placeholders_with_suffixed_keys() -> None:
    model = _dqn()
    a, b, c = UnpicklableExpert(name="a"), UnpicklableExpert(name="b"), UnpicklableExpert(name="c")
    model.first = {"llm": a}  # type: ignore[attr-defined]
    model.second = {"llm": b}  # type: ignore[attr-defined]
    model.third = [{"llm": c}]  # type: ignore[attr-defined]
    snap = snapshot_model(model)
    found = _by_key(snap)
    assert set(found) == {"llm", "llm_2", "llm_3"}
    assert found["llm"].paths == ["first.llm"] and found["llm"].hint["model"] == "a"
    assert found["llm_2"].paths == ["second.llm"] and found["llm_2"].hint["model"] == "b"
    assert found["llm_3"].paths == ["third[0].llm"] and found["llm_3"].hint["model"] == "c"


def test_declared_key_collides_with_found_key() -> None:
    model = _dqn()
    declared, found = UnpicklableExpert(name="declared"), UnpicklableExpert(name="found")
    model.mine = declared  # type: ignore[attr-defined]
    model.other = {"llm": found}  # type: ignore[attr-defined]
    snap = snapshot_model(model, resources={"llm": declared})
    by_key = _by_key(snap)
    assert by_key["llm"].reason == "declared" and by_key["llm"].paths == ["mine"]
    assert by_key["llm_2"].reason == "unpicklable" and by_key["llm_2"].paths == ["other.llm"]


def test_key_from_odd_path_components() -> None:
    model = _dqn()
    model.table = {3: UnpicklableExpert(), "has space": UnpicklableExpert()}  # type: ignore[attr-defined]
    # mixed key types: no codec takes the dict apart, so the whole (unpicklable) dict is the resource
    (ph,) = snapshot_model(model).placeholders
    assert (ph.key, ph.paths, ph.reason, ph.type) == ("table", ["table"], "unpicklable", "builtins.dict")
    model.table = {"has space": UnpicklableExpert(), "x-y": UnpicklableExpert()}  # type: ignore[attr-defined]
    keys = {p.key: p.paths for p in snapshot_model(model).placeholders}
    assert keys == {"has_space": ["table[has space]"], "x_y": ["table[x-y]"]}


# -------------------------------------------------------------------------------------- declared
def test_declared_resource_via_save_argument(tmp_path: pathlib.Path) -> None:
    model = _dqn()
    config = Opaque({"temperature": 0.5})
    model.llm_config = config  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError, match="llm_config"):
        model.save(tmp_path / "m")
    model.save(tmp_path / "m", resources={"cfg": config})
    (ph,) = sb3_safe_save.read_manifest(tmp_path / "m.safetensors").placeholders
    assert (ph.key, ph.paths, ph.reason) == ("cfg", ["llm_config"], "declared")
    assert ph.type.endswith("Opaque")
    with pytest.raises(MissingResourceError, match="cfg"):
        safe(DQN).load(tmp_path / "m.safetensors")
    loaded = safe(DQN).load(tmp_path / "m.safetensors", resources={"cfg": config})
    assert loaded.llm_config is config


class DeclaringDQN(SafeSaveMixin, DQN):
    safe_save_resources = {"expert": "policy_kwargs.vlm_model"}


def test_declared_resource_via_class_attribute(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert()
    with pytest.warns(sb3_safe_save.HazardWarning, match="shared_with_target"):  # at build
        model = DeclaringDQN(  # registered naively: its weights are in the state dict, under two prefixes
            NaiveDQNPolicy, "CartPole-v1", policy_kwargs={"vlm_model": expert, "net_arch": [8]}, device="cpu"
        )  # fmt: skip
    model.save(tmp_path / "m")
    manifest = sb3_safe_save.read_manifest(tmp_path / "m.safetensors")
    (ph,) = manifest.placeholders
    assert ph.key == "expert" and ph.reason == "declared"
    assert {"policy_kwargs.vlm_model", "policy.q_net.vlm_model", "policy.q_net_target.vlm_model"} <= set(ph.paths)
    # the module's weights are not stored: its state-dict prefix is recorded as external
    (entry,) = [e for e in manifest.state_dicts if e.name == "policy"]
    assert set(entry.external_prefixes) == {"q_net.vlm_model.", "q_net_target.vlm_model."}
    assert not any("vlm_model" in k for k in manifest.tensors)
    with pytest.warns(sb3_safe_save.HazardWarning, match=r"^shared_with_target \(found when the model was loaded\)"):
        loaded = DeclaringDQN.load(tmp_path / "m.safetensors", resources={"expert": expert}, trusted=[NaiveDQNPolicy])
    assert loaded.policy.q_net.vlm_model is expert


def test_declared_object_absent_from_model_makes_no_placeholder_and_is_warned_about() -> None:
    with pytest.warns(UserWarning, match=r"resources/specs/optional given for \['unused'\], which match no resource"):
        snap = snapshot_model(_dqn(), resources={"unused": UnpicklableExpert()})
    assert snap.placeholders == []


# ------------------------------------------------------------------------------------ too large
def test_too_large_by_max_object_bytes(tmp_path: pathlib.Path) -> None:
    model = _dqn()
    model.corpus = Opaque(b"x" * 200_000)  # type: ignore[attr-defined]
    model.small = 1  # type: ignore[attr-defined]
    snap = snapshot_model(model, max_object_bytes=100_000)
    (ph,) = snap.placeholders
    assert ph.key == "corpus" and ph.reason == "too_large" and ph.paths == ["corpus"]
    assert "100000" in str(ph.hint["detail"])
    # under the threshold the same value is an ordinary (unsupported) value
    with pytest.raises(UnsupportedObjectError, match="corpus"):
        snapshot_model(model, max_object_bytes=1_000_000)
    # and the file does not hold it
    model.save(tmp_path / "m", max_object_bytes=100_000)
    assert (tmp_path / "m.safetensors").stat().st_size < 100_000


def test_default_threshold() -> None:
    model = _dqn()
    model.blob = b"\0" * (DEFAULT_MAX_OBJECT_BYTES + 1)  # type: ignore[attr-defined]
    (ph,) = snapshot_model(model).placeholders
    assert ph.reason == "too_large"


def test_probe_never_materialises_the_pickle() -> None:
    huge = b"\1" * (200 * 1024 * 1024)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        error, size = probe_pickle(huge, 1024 * 1024)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (error, size) == (None, None)  # picklable, but over the limit
    assert peak < 8 * 1024 * 1024, f"the probe allocated {peak} bytes"
    assert elapsed < 1.0

    many = list(range(3_000_000))  # ~15 MB of pickle in many small writes: stopped after the limit
    t0 = time.perf_counter()
    assert probe_pickle(many, 100_000) == (None, None)
    assert time.perf_counter() - t0 < 1.0

    assert probe_pickle(b"abc", 1000)[0] is None and probe_pickle(b"abc", 1000)[1] < 100  # type: ignore[operator]
    error, size = probe_pickle(UnpicklableExpert(), 1000)
    assert size is None and error is not None and "cannot pickle LLM" in error


def test_walk_of_huge_module_attribute_is_fast() -> None:
    """A large object hanging off a module (no codec for it) is probed, not pickled."""
    model = _dqn()
    model.policy.q_net.cache = bytearray(300 * 1024 * 1024)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    snap = snapshot_model(model)
    assert time.perf_counter() - t0 < 3.0
    (ph,) = snap.placeholders
    assert ph.reason == "too_large" and ph.paths == ["policy.q_net.cache"]


# ---------------------------------------------------------------------------------------- cycles
def test_cyclic_list_is_a_problem_not_a_recursion() -> None:
    model = _dqn()
    cycle: list[Any] = [1]
    cycle.append(cycle)
    model.cycle = cycle  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError) as info:
        snapshot_model(model)
    ((path, _, detail),) = info.value.problems
    assert path == "cycle[1]" and "cyclic" in detail


def test_cyclic_dict_and_deep_nesting() -> None:
    model = _dqn()
    a: dict[str, Any] = {}
    b = {"a": a}
    a["b"] = b
    model.cyc = a  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError, match="cyclic"):
        snapshot_model(model)
    del model.cyc  # type: ignore[attr-defined]
    deep: list[Any] = []
    node = deep
    for _ in range(5000):
        node.append([])
        node = node[0]
    model.deep = deep  # type: ignore[attr-defined]
    with pytest.raises(UnsupportedObjectError, match="too deeply nested"):
        snapshot_model(model)


def test_shared_but_acyclic_values_are_fine(tmp_path: pathlib.Path) -> None:
    model = _dqn()
    shared = [1, 2, 3]
    model.pair = (shared, shared)  # type: ignore[attr-defined]
    model.save(tmp_path / "m")
    loaded = safe(DQN).load(tmp_path / "m.safetensors")
    assert loaded.pair == ([1, 2, 3], [1, 2, 3])


def test_cyclic_module_attribute_does_not_hang() -> None:
    model = _dqn()
    loop: list[Any] = []
    loop.append(loop)
    model.policy.q_net.loop = loop  # type: ignore[attr-defined]
    snap = snapshot_model(model)  # plain module attributes are rebuilt by the constructor
    assert snap.placeholders == []


# ----------------------------------------------------------------------------------- state dicts
class _Tied(th.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = th.nn.Linear(3, 3)
        self.b = th.nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied weights
        self.same = self.a  # the same module under two names
        self.register_buffer("view", self.a.bias.detach()[1:])  # shares storage, different offset


def test_state_dict_aliases_are_deduplicated() -> None:
    walker = Walker()
    module = _Tied()
    entry = walker._module_state("net", module, [])
    assert entry.aliases == {"b.weight": "a.weight", "same.weight": "a.weight", "same.bias": "a.bias"}
    assert entry.keys == ["view", "a.weight", "a.bias", "b.bias"]  # state_dict order: own buffers first
    assert set(walker.tensors) == {f"net/{k}" for k in entry.keys}
    assert walker.tensors["net/a.weight"] is module.a.weight or th.equal(walker.tensors["net/a.weight"], module.a.weight)


def test_external_module_prefixes_skip_its_weights() -> None:
    walker = Walker()
    module = _Tied()
    entry = walker._module_state("net", module, ["b."])
    assert "b.bias" not in entry.keys and "b.weight" not in entry.aliases
    assert entry.external_prefixes == ["b."]


def test_optimizer_state_of_external_params_dropped_param_groups_intact() -> None:
    own = th.nn.Linear(2, 2)
    external = th.nn.Linear(2, 2)
    opt = th.optim.Adam([{"params": own.parameters()}, {"params": external.parameters(), "lr": 0.5}])
    (own(th.ones(1, 2)).sum() + external(th.ones(1, 2)).sum()).backward()
    opt.step()
    full = opt.state_dict()
    assert set(full["state"]) == {0, 1, 2, 3}

    walker = Walker()
    entry = walker._optimizer_state("opt", opt, {id(p) for p in external.parameters()})
    assert entry.dropped == [2, 3]
    state = entry.state.items["state"]  # type: ignore[union-attr]
    assert set(state.items) == {"0", "1"}
    groups = entry.state.items["param_groups"]  # type: ignore[union-attr]
    assert [g.items["params"].items for g in groups.items] == [[0, 1], [2, 3]]
    assert groups.items[1].items["lr"] == 0.5


def test_optimizer_holding_expert_params_roundtrip(tmp_path: pathlib.Path) -> None:
    """End to end: an optimizer that trained the expert too; its state for the expert is dropped."""
    th.manual_seed(0)
    expert = ModuleExpert(width=8)
    for p in expert.parameters():
        p.requires_grad_(True)
    # registered: its parameters are in the optimizer (tau=0: the target update leaves the shared tensors alone)
    model = make_naive_model(expert, net_arch=[8], tau=0.0)
    model.learn(60)
    q_net = model.policy.q_net
    obs = th.randn(5, 4)
    loss = q_net(obs).sum() + q_net.query_expert(obs).sum()
    model.policy.optimizer.zero_grad()
    loss.backward()
    model.policy.optimizer.step()
    n_expert = len(list(expert.parameters()))
    original = model.policy.optimizer.state_dict()
    n_all = len(original["param_groups"][0]["params"])
    assert len(original["state"]) == n_all

    model.save(tmp_path / "m")  # the hazards were warned when the model was built
    manifest = sb3_safe_save.read_manifest(tmp_path / "m.safetensors")
    (opt_entry,) = [e for e in manifest.state_dicts if e.name == "policy.optimizer"]
    assert opt_entry.dropped == list(range(n_all - n_expert, n_all))
    assert "external_in_optimizer" in {h.code for h in manifest.hazards}

    with pytest.warns(sb3_safe_save.HazardWarning, match="found when the model was loaded"):
        loaded = CustomDQN.load(
            tmp_path / "m.safetensors", resources={"vlm_model": expert}, device="cpu", trusted=[NaiveDQNPolicy]
        )
    restored = loaded.policy.optimizer.state_dict()
    assert_same_tree(original["param_groups"], restored["param_groups"], "param_groups")
    assert set(restored["state"]) == set(range(n_all - n_expert))
    assert_same_tree({k: original["state"][k] for k in restored["state"]}, restored["state"], "state")
    # the rebuilt optimizer holds the expert's (live) parameters, as the original did
    params = [p for g in loaded.policy.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in expert.parameters()} <= {id(p) for p in params}
    loaded.set_env(model.get_env())
    loaded.learn(16, reset_num_timesteps=False)


def test_external_module_size_estimate_and_hint() -> None:
    expert = ModuleExpert(width=32, depth=2)
    expert.register_buffer("table", th.zeros(10, dtype=th.float64))
    model = make_model(expert, net_arch=[8])
    (ph,) = snapshot_model(model).placeholders
    n_params = sum(p.numel() for p in expert.parameters())
    assert ph.hint["num_parameters"] == n_params
    assert ph.size_bytes == n_params * 4 + 10 * 8
    assert ph.hint["dtype"] == "float32" and ph.hint["device"] == "cpu"
    assert ph.hint["name_or_path"] == "module-expert-32x2"
