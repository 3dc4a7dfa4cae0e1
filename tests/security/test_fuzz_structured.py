"""Property test over *structured* forgeries (issue 10): field-level mutations that keep the JSON valid.

Random byte flips only ever meet the checksum. Here hypothesis edits what a file *means* — import
references, attribute paths, data keys, node kinds, shapes and sizes, resource specs, state-dict
tables and the tensors themselves — and every checksum is recomputed, as an attacker would. The
property, for each forged file loaded with a plain ``safe(PPO).load``:

* it raises a ``SafeSaveError``, or returns a model whose every parameter is the file's tensor for it
  (no uninitialised memory, nothing from elsewhere), on the caller's device, that can predict;
* it never runs a command (marker file), never imports a new module (canary module; no new top-level
  package), never changes a class or module attribute process-wide, never writes a file;
* it stays within a generous time bound.

CI runs 2,000 cases (two tests of 1,000, so ``-n 2`` splits them); ``SB3SS_FUZZ_EXAMPLES=20000
SB3SS_FUZZ_RANDOM=1`` explores further.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch as th
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stable_baselines3 import PPO

from _attack import Guard, base, make_canary
from sb3_safe_save import SafeSaveError, safe
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import checksum, to_blob, write_stream

SECONDS = 10.0  # per load; a load of this file takes ~20 ms on an idle core
_SCALE = int(os.environ.get("SB3SS_FUZZ_EXAMPLES", "2000")) / 2000
FUZZ = settings(
    max_examples=max(1, int(1000 * _SCALE)),
    deadline=timedelta(seconds=SECONDS),
    derandomize=not os.environ.get("SB3SS_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


# ----------------------------------------------------------------------------------- the arena
class Arena:
    """One base file, split into manifest and tensors once; a canary module and marker files in one folder."""

    def __init__(self, folder: Path) -> None:
        data = base()
        (n,) = np.frombuffer(data[:8], dtype="<u8")
        self.metadata = dict(json.loads(data[8 : 8 + int(n)])["__metadata__"])
        self.manifest = json.loads(self.metadata[META_MANIFEST])
        self.tensors = safetensors.torch.load(data)
        self.folder = folder
        self.canary = make_canary(folder)
        self.marker = folder / "pwned"
        self.victim = folder / "victim.txt"
        self.victim.write_text("precious\n")
        self.work = folder / "cwd"
        self.work.mkdir()
        self.refs: list[str] | None = None
        self.nodes: st.SearchStrategy[Any] | None = None

    def seal(self, manifest: dict[str, Any], tensors: dict[str, th.Tensor]) -> bytes:
        blobs = {k: to_blob(v) for k, v in tensors.items()}
        manifest["tensors"] = {
            k: {"dtype": b.dtype, "shape": list(b.shape), "xxh3": checksum(b.data)} for k, b in blobs.items()
        }
        text = json.dumps(manifest)
        out = io.BytesIO()
        write_stream(out, blobs, {**self.metadata, META_MANIFEST: text, META_CHECKSUM: checksum(text.encode())})
        return out.getvalue()


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Arena:
    found = Arena(tmp_path_factory.mktemp("arena"))
    sys.path.insert(0, str(found.folder))
    yield found  # type: ignore[misc]
    sys.path.remove(str(found.folder))


# ------------------------------------------------------------------------------------- the pools
def _refs(a: Arena) -> list[str]:
    if a.refs is None:
        a.refs = _ref_pool(a)
    return a.refs


def _ref_pool(a: Arena) -> list[str]:
    return [
        # hostile: chains through modules, re-exports, methods, foreign modules, the canary
        "stable_baselines3.ppo.ppo:th.os.system",
        "stable_baselines3.common.utils:th._strobelight.cli_function_profiler.subprocess.Popen",
        "stable_baselines3.common.utils:th.nn.ReLU",
        "stable_baselines3.common.utils:th",
        "torch.optim.adam:torch.os.getcwd",
        "torch.optim.adam:Adam.step",
        "stable_baselines3.common.monitor:ResultsWriter",
        "stable_baselines3.common.logger:HumanOutputFormat",
        "stable_baselines3.common.logger:Logger",
        "stable_baselines3.common.save_util:load_from_pkl",
        "stable_baselines3:PPO",
        "builtins:eval",
        "os:system",
        "subprocess:Popen",
        "numpy:load",
        a.canary.ref,
        f"{a.canary.module}:PPO",
        # legitimate classes, often in the wrong slot
        "torch.nn.modules.activation:ReLU",
        "torch.nn.modules.activation:Tanh",
        "torch.optim.adam:Adam",
        "torch.optim.sgd:SGD",
        "stable_baselines3.common.policies:ActorCriticPolicy",
        "stable_baselines3.common.torch_layers:FlattenExtractor",
        "stable_baselines3.common.torch_layers:NatureCNN",
        "stable_baselines3.common.utils:ConstantSchedule",
        "stable_baselines3.common.utils:FloatSchedule",
        "stable_baselines3.common.buffers:RolloutBuffer",
        "stable_baselines3.common.buffers:ReplayBuffer",
        "stable_baselines3.common.type_aliases:TrainFreq",
        "stable_baselines3.common.type_aliases:TrainFrequencyUnit",
        "stable_baselines3.common.noise:NormalActionNoise",
        "stable_baselines3.ppo.ppo:PPO",
        "gymnasium.spaces.box:Box",
        "numpy:float32",
    ]


PATHS = [
    "policy.optimizer_class.step",
    "policy.activation_fn.forward",
    "policy.features_extractor_class.forward",
    "policy.optimizer.step",
    "policy.action_net.forward",
    "policy.squash_output",
    "policy.observation_space.sample",
    "policy.__class__",
    "policy.__init__",
    "policy.__dict__",
    "policy.mlp_extractor",
    "policy.action_net",
    "policy.optimizer",
    "policy.features_extractor.flatten",
    "policy",
    "expert",
    "a" + "[0]" * 10 + "-",
    "x[0]",
    "x[-1]",
    "a..b",
    "_logger",
    "env",
]
KEYS = [
    "env", "device", "replay_buffer", "rollout_buffer", "policy", "_logger", "_custom_logger", "_vec_normalize_env",
    "predict", "learn", "logger", "policy_aliases", "get_env", "__class__", "__dict__", "__init__", "expert", "extra",
    "n_steps", "observation_space", "policy_class", "lr_schedule", "_last_obs",
]  # fmt: skip
INTS = [-(2**63), -1, 0, 1, 2, 3, 4, 16, 17, 255, 8192, 10**6, 2**31, 2**48, 2**63 - 1, 2**64]
STRINGS = [
    "", "x", "cpu", "meta", "cuda:99", "<f4", "<f8", "<i8", "|b1", "|O", "<U4", ">f4", "[('a','<f4')]", "complex64",
    "float32", "F32", "nan", "inf", "step", "episode", "CartPole-v1", "NoSuchEnv-v0",
]  # fmt: skip
KINDS = [
    "list", "tuple", "dict", "deque", "float", "ref", "ndarray", "np_scalar", "tensor", "device", "torch_dtype",
    "np_dtype", "space", "object", "enum", "namedtuple", "placeholder", "pickle", "schedule",
]  # fmt: skip


def _nodes(a: Arena) -> st.SearchStrategy[Any]:
    if a.nodes is None:
        a.nodes = _node_strategy(a)
    return a.nodes


def _node_strategy(a: Arena) -> st.SearchStrategy[Any]:
    refs = st.sampled_from(_refs(a))
    tensor_keys = st.sampled_from(sorted(a.tensors))
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(INTS),
        st.sampled_from([0.5, -1.0, 1e308]),
        st.sampled_from(STRINGS),
        st.builds(lambda r: {"kind": "ref", "ref": r}, refs),
        st.builds(lambda v: {"kind": "float", "value": v}, st.sampled_from(["nan", "inf", "-inf"])),
        st.builds(lambda v: {"kind": "device", "value": v}, st.sampled_from(["cpu", "meta", "cuda:99", "xla", "cpu:0"])),
        st.builds(lambda v: {"kind": "np_dtype", "value": v}, st.sampled_from(STRINGS)),
        st.builds(lambda v: {"kind": "torch_dtype", "name": v}, st.sampled_from(STRINGS)),
        st.builds(
            lambda d, v: {"kind": "np_scalar", "dtype": d, "value": v},
            st.sampled_from(STRINGS),
            st.one_of(st.sampled_from(INTS), st.sampled_from(["nan", "inf"])),
        ),
        st.builds(lambda t, rg: {"kind": "tensor", "tensor": t, "requires_grad": rg}, tensor_keys, st.booleans()),
        st.builds(
            lambda t, d, s: {"kind": "ndarray", "tensor": t, "dtype": d, "shape": s},
            tensor_keys,
            st.sampled_from(STRINGS),
            st.lists(st.sampled_from(INTS), max_size=3),
        ),
        st.builds(lambda t: {"kind": "pickle", "tensor": t, "type": "x"}, tensor_keys),
        st.builds(lambda k: {"kind": "placeholder", "key": k}, st.sampled_from(["expert", "x", "nope"])),
        st.builds(lambda c, v: {"kind": "enum", "cls": c, "value": v}, refs, st.sampled_from(["step", "episode", 1, None])),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.builds(lambda i: {"kind": "list", "items": i}, st.lists(inner, max_size=3)),
            st.builds(lambda i: {"kind": "tuple", "items": i}, st.lists(inner, max_size=3)),
            st.builds(
                lambda i, m: {"kind": "deque", "items": i, "maxlen": m},
                st.lists(inner, max_size=3),
                st.sampled_from([None, 0, 1, 10**6]),
            ),
            st.builds(
                lambda i, kt: {"kind": "dict", "items": i, "key_type": kt},
                st.dictionaries(st.sampled_from([*KEYS, "0", "1"]), inner, max_size=3),
                st.sampled_from(["str", "int"]),
            ),
            st.builds(
                lambda c, s: {"kind": "object", "cls": c, "state": s},
                refs,
                st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
            ),
            st.builds(
                lambda c, f: {"kind": "namedtuple", "cls": c, "fields": f},
                refs,
                st.dictionaries(st.sampled_from(["freq", "unit", "x"]), inner, max_size=2),
            ),
            st.builds(
                lambda kind, args, knots: {"kind": "schedule", "schedule": kind, "args": args, "knots": knots},
                st.sampled_from(["constant", "linear", "float", "piecewise_linear"]),
                st.dictionaries(st.sampled_from(["val", "start", "end", "end_fraction", "value_schedule"]), inner, max_size=3),
                st.lists(st.tuples(st.sampled_from([0.0, 1.0, 0.5, -1.0]), st.sampled_from([0.0, 1e308, -1.0])), max_size=3),
            ),
            st.builds(
                lambda sp, args: {"kind": "space", "space": sp, "args": args},
                st.sampled_from(["Box", "Discrete", "MultiDiscrete", "MultiBinary", "Dict", "Tuple"]),
                st.dictionaries(
                    st.sampled_from(["low", "high", "shape", "dtype", "n", "start", "nvec", "spaces"]), inner, max_size=4
                ),
            ),
        ),
        max_leaves=4,
    )


# ---------------------------------------------------------------------------------- the mutations
def _locations(tree: Any, where: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [where]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.extend(_locations(v, (*where, k)))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.extend(_locations(v, (*where, i)))
    return out


def _get(tree: Any, where: tuple[Any, ...]) -> Any:
    for part in where:
        tree = tree[part]
    return tree


Draw = st.DataObject
Manifest = dict[str, Any]
Tensors = dict[str, th.Tensor]


def _edit_ref(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """Any reference field: ``ref``, ``cls``, a spec's ``factory``, ``algorithm``."""
    spots = [w for w in _locations(m) if w and w[-1] in ("ref", "cls", "factory", "algorithm", "base_algorithm")]
    if spots:
        w = data.draw(st.sampled_from(spots), label="where")
        _get(m, w[:-1])[w[-1]] = data.draw(st.sampled_from(_refs(a)), label="ref")


def _edit_path(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """Placeholder paths (optional: load binds a stand-in there), state-dict names, torch variables."""
    spot = data.draw(st.sampled_from(["placeholder", "state_dict", "torch_variable"]), label="spot")
    path = data.draw(st.sampled_from(PATHS), label="path")
    if spot == "placeholder":
        key = data.draw(st.sampled_from(["expert", "x"]), label="key")
        m["placeholders"].append({"key": key, "paths": [path], "type": "t", "reason": "declared", "optional": True})
    elif spot == "state_dict":
        data.draw(st.sampled_from(m["state_dicts"]), label="entry")["name"] = path
    else:
        m["torch_variables"][path] = data.draw(_nodes(a), label="node")


def _edit_key(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """A data key SB3's save could not have written (or could, with another value)."""
    m["data"][data.draw(st.sampled_from(KEYS), label="key")] = data.draw(_nodes(a), label="node")


def _edit_kind(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """A node changes kind, keeping its fields."""
    spots = [w for w in _locations(m) if w and w[-1] == "kind" and w[0] in ("data", "state_dicts", "torch_variables")]
    if spots:
        w = data.draw(st.sampled_from(spots), label="where")
        _get(m, w[:-1])["kind"] = data.draw(st.sampled_from([*KINDS, "module", "optimizer"]), label="kind")


def _edit_int(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """Shapes, sizes, counts, ``maxlen``, ``n``, hyperparameters."""
    spots = [w for w in _locations(m) if isinstance(_get(m, w), int) and not isinstance(_get(m, w), bool)]
    if spots:
        w = data.draw(st.sampled_from(spots), label="where")
        _get(m, w[:-1])[w[-1]] = data.draw(st.sampled_from(INTS), label="int")


def _edit_node(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """Any node of the data tree replaced by a generated one."""
    containers = ("items", "state", "args", "fields")
    spots = [w for w in _locations(m) if len(w) >= 2 and w[0] == "data" and (len(w) == 2 or w[-2] in containers)]
    w = data.draw(st.sampled_from(spots), label="where")
    _get(m, w[:-1])[w[-1]] = data.draw(_nodes(a), label="node")


def _edit_spec(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """A placeholder whose spec names a factory, at a data attribute or a module path, maybe optional or lazy."""
    factory = data.draw(st.sampled_from(_refs(a)), label="factory")
    kwargs = data.draw(
        st.sampled_from(
            [
                {},
                {"command": f"touch {a.marker}"},
                {"args": ["touch", str(a.marker)]},
                {"filename_or_textio": str(a.victim)},
                {"filename": str(a.marker)},
                {"policy": "MlpPolicy", "env": f"{a.canary.module}:Thing-v0"},
            ]
        ),
        label="kwargs",
    )
    path = data.draw(st.sampled_from(["expert", "policy.expert", "policy.optimizer_class.step", "policy_kwargs.expert"]))
    spec = {"factory": factory, "kwargs": kwargs, "lazy": data.draw(st.booleans(), label="lazy")}
    optional = data.draw(st.booleans(), label="optional")
    m["placeholders"].append(
        {"key": "expert", "paths": [path], "type": "t", "reason": "declared", "spec": spec, "optional": optional}
    )
    if path == "expert":
        m["data"]["expert"] = {"kind": "placeholder", "key": "expert"}


def _edit_state_dict(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """External prefixes, dropped or duplicated keys, aliases; optimizer state replaced."""
    entry = data.draw(st.sampled_from(m["state_dicts"]), label="entry")
    if entry["kind"] != "module":
        entry["state"] = data.draw(_nodes(a), label="state")
        return
    keys = entry["keys"]
    what = data.draw(st.sampled_from(["external", "drop", "alias", "dup"]), label="what")
    key = data.draw(st.sampled_from(keys), label="k") if keys else ""
    if what == "external":
        prefix = data.draw(st.sampled_from(["action_net.", "mlp_extractor.", "", "value_net.bias", "x."]), label="prefix")
        entry["external_prefixes"] = [prefix]
        if data.draw(st.booleans(), label="drop_too"):
            entry["keys"] = [k for k in keys if not k.startswith(prefix)]
    elif what == "drop" and key:
        keys.remove(key)
    elif what == "alias" and key:
        entry["aliases"][data.draw(st.sampled_from([*keys, "x"]), label="alias")] = key
    elif key:
        keys.append(key)


def _edit_tensor(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """The tensors themselves: dtype, shape, presence, NaN."""
    key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    what = data.draw(st.sampled_from(["dtype", "flatten", "grow", "shrink", "drop", "add", "nan"]), label="what")
    t = tensors[key]
    if what == "dtype":
        tensors[key] = t.to(data.draw(st.sampled_from([th.float64, th.float16, th.int64, th.uint8, th.bool]), label="dtype"))
    elif what == "flatten":
        tensors[key] = t.reshape(-1).clone()
    elif what == "grow":
        tensors[key] = th.cat([t.reshape(-1), t.reshape(-1)]).clone() if t.numel() else th.zeros(3)
    elif what == "shrink":
        tensors[key] = t.reshape(-1)[: max(0, t.numel() - 1)].clone()
    elif what == "drop":
        del tensors[key]
    elif what == "add":
        name = data.draw(st.sampled_from(["policy/extra", "x", "policy.optimizer.state[9].exp_avg"]), label="name")
        tensors[name] = th.ones(2)
    elif t.is_floating_point():
        tensors[key] = th.full_like(t, float("nan"))


def _edit_string(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """Any string field: dtypes, keys, kinds, refs, paths, versions."""
    spots = [w for w in _locations(m) if isinstance(_get(m, w), str)]
    w = data.draw(st.sampled_from(spots), label="where")
    _get(m, w[:-1])[w[-1]] = data.draw(st.sampled_from(STRINGS + PATHS + KEYS + _refs(a)), label="string")


MUTATIONS = {
    "ref": _edit_ref,
    "path": _edit_path,
    "key": _edit_key,
    "kind": _edit_kind,
    "int": _edit_int,
    "node": _edit_node,
    "spec": _edit_spec,
    "state_dict": _edit_state_dict,
    "tensor": _edit_tensor,
    "string": _edit_string,
}


def _mutate(data: Draw, a: Arena, m: Manifest, tensors: Tensors) -> None:
    """One field-level edit, chosen by what the field means."""
    MUTATIONS[data.draw(st.sampled_from(sorted(MUTATIONS)), label="op")](data, a, m, tensors)


# ------------------------------------------------------------------------------------ the property
def _assert_faithful(model: Any, manifest: dict[str, Any], tensors: dict[str, th.Tensor]) -> None:
    """A model that loaded holds the file's tensors in every parameter, on the CPU, and predicts."""
    assert model.device.type == "cpu"
    for entry in manifest["state_dicts"]:
        if entry["kind"] != "module":
            continue
        module = model
        for part in entry["name"].split("."):
            module = getattr(module, part)
        for key, value in module.state_dict().items():
            canonical = entry.get("aliases", {}).get(key, key)
            stored = tensors.get(f"{entry['name']}/{canonical}")
            assert stored is not None, f"{entry['name']}.{key} was not filled from the file"
            assert value.device.type == "cpu"
            expected = stored.to(value.dtype)
            assert value.shape == stored.shape, key
            assert np.array_equal(value.numpy(), expected.numpy(), equal_nan=value.is_floating_point()), key
    if all(p.isfinite().all() for p in model.policy.parameters()):  # NaN weights are the file's, and cannot act
        model.predict(model.observation_space.sample(), deterministic=True)


def _check(a: Arena, data: st.DataObject) -> None:
    m = copy.deepcopy(a.manifest)
    tensors = dict(a.tensors)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        _mutate(data, a, m, tensors)
    try:
        forged = a.seal(m, tensors)
    except (ValueError, TypeError, OverflowError, RuntimeError):  # not writable as a file at all
        return
    guard = Guard.take()
    start = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = safe(PPO).load(io.BytesIO(forged))
            except SafeSaveError:
                model = None
                guard.check_rng()
        assert time.monotonic() - start < SECONDS
        guard.check()
    except BaseException:
        guard.restore()  # one hole must not spoil the examples after it
        raise
    a.canary.assert_untouched()
    assert not a.marker.exists() and not list(a.folder.glob("pwned*")), "the forged file ran a command or wrote a file"
    assert a.victim.read_text() == "precious\n"
    assert list(a.work.iterdir()) == []
    if model is not None:
        _assert_faithful(model, m, tensors)


@pytest.fixture
def in_work(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> Arena:
    monkeypatch.chdir(arena.work)
    th.set_num_threads(1)
    return arena


@FUZZ
@given(data=st.data())
def test_structured_forgeries_a(in_work: Arena, data: st.DataObject) -> None:
    _check(in_work, data)


@FUZZ
@given(data=st.data())
def test_structured_forgeries_b(in_work: Arena, data: st.DataObject) -> None:
    _check(in_work, data)
