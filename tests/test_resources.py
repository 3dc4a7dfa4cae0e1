"""Rebuilding live resources at load (issue 5): specs, registry, entry points, trust, lazy, optional, fingerprints.

The fresh-process tests run ``CustomDQN.load(path)`` with no ``resources=`` in a real subprocess, so
nothing built in this process (registrations, imported modules) can help the load.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import uuid
from typing import Any

import numpy as np
import pytest

from lang_dqn import CustomDQN, CustomDQNPolicy, ModuleExpert, UnpicklableExpert, build_expert, make_model
from sb3_safe_save import (
    LazyResource,
    MissingResourceError,
    ResourceMismatchError,
    ResourceSpec,
    UnresolvedResourceError,
    factory,
    lazy,
    read_manifest,
    register_resource,
    unregister_resource,
    unwrap,
)
from sb3_safe_save._resources import Unbound, fingerprint_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "stub-llm-7b"  # the name the test plugin's entry point reads from the placeholder's hint
SPEC = ResourceSpec(factory="lang_dqn:build_expert", kwargs={"kind": "unpicklable", "name": NAME, "seed": 0})
N_THREADS = 8
POLICY = ["lang_dqn:CustomDQNPolicy"]  # what subclasses defined here must trust to load a lang_dqn policy


# ------------------------------------------------------------------------------------------ helpers
class NamedExpert(UnpicklableExpert):
    """An expert with a fingerprint (``__sb3_fingerprint__``) and its own spec (``__sb3_resource_spec__``)."""

    def __init__(self, name: str = NAME, seed: int = 0) -> None:
        super().__init__(name=name, seed=seed)
        self.seed = seed

    def __sb3_fingerprint__(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed}

    def __sb3_resource_spec__(self) -> dict[str, Any]:
        return {"factory": "lang_dqn:build_expert", "kwargs": {"name": self.name, "seed": self.seed}}


class SpecDQN(CustomDQN):
    """Class-level declarations: a spec and an optional key."""

    safe_save_specs = {"vlm_model": {"factory": "lang_dqn:build_expert", "kwargs": {"name": "from-class", "seed": 0}}}


class UndeclaredSpecDQN(SpecDQN):
    safe_save_trusted = ()  # not even what CustomDQN trusts


class OptionalDQN(CustomDQN):
    safe_save_optional = ("vlm_model",)


def actions(model: Any, obs: np.ndarray, use_expert: bool = True) -> np.ndarray:
    model.policy.set_use_expert(use_expert)
    try:
        return model.predict(obs, deterministic=True)[0]
    finally:
        model.policy.set_use_expert(False)


def expert_of(model: Any) -> Any:
    return unwrap(model.policy.q_net.vlm_model)  # lang_dqn holds it through external()


class Counter:
    """A factory that counts its calls and is slow, so racing threads overlap inside it."""

    def __init__(self, make: Any = lambda: UnpicklableExpert(name=NAME, seed=0)) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.make = make

    def __call__(self, *_: Any, **__: Any) -> Any:
        with self.lock:
            self.calls += 1
        threading.Event().wait(0.2)
        return self.make()


def race(model: Any, obs: np.ndarray) -> list[np.ndarray]:
    """``N_THREADS`` threads call ``predict`` (using the expert) at the same moment."""
    model.policy.set_use_expert(True)
    barrier = threading.Barrier(N_THREADS)
    results: list[Any] = [None] * N_THREADS

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = model.predict(obs, deterministic=True)[0]
        except BaseException as e:  # reported by the main thread
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(N_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    model.policy.set_use_expert(False)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def write_factory_module(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A never-imported module on ``sys.path`` with a counting, slow ``build(**kwargs)`` factory."""
    name = f"rebuild_factory_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(
        "import threading\n"
        "from lang_dqn import UnpicklableExpert\n"
        "calls = 0\n"
        "_lock = threading.Lock()\n"
        "def build(**kwargs):\n"
        "    global calls\n"
        "    with _lock:\n"
        "        calls += 1\n"
        "    threading.Event().wait(0.2)\n"
        "    return UnpicklableExpert(**kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert name not in sys.modules
    return name


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained() -> Any:
    model = make_model(UnpicklableExpert(name=NAME, seed=0), net_arch=[16])
    model.learn(80)
    return model


@pytest.fixture(scope="module")
def obs(trained: Any) -> np.ndarray:
    space = trained.observation_space
    space.seed(7)
    return np.stack([space.sample() for _ in range(256)])


@pytest.fixture(scope="module")
def expected(trained: Any, obs: np.ndarray) -> np.ndarray:
    with_expert = actions(trained, obs, True)
    assert not np.array_equal(with_expert, actions(trained, obs, False)), "the expert must change some actions"
    return with_expert


@pytest.fixture
def registry() -> Any:
    """Register factories for one test only."""
    added: list[Any] = []

    def register(key: Any, fn: Any) -> None:
        register_resource(key, fn)
        added.append(key)

    yield register
    for key in added:
        unregister_resource(key)


# ------------------------------------------------------------------------------- fresh process routes
SCRIPT = r"""
import json, sys
import numpy as np
from lang_dqn import CustomDQN, UnpicklableExpert
from sb3_safe_save import unwrap

route, path, obs_path = sys.argv[1:4]
built = []
if route == "registry":
    from sb3_safe_save import register_resource

    def rebuild(placeholder):
        built.append(placeholder.key)
        return UnpicklableExpert(name=placeholder.hint["model"], seed=0)

    register_resource("vlm_model", rebuild)
model = CustomDQN.load(path)
expert = unwrap(model.policy.q_net.vlm_model)
model.policy.set_use_expert(True)
actions = model.predict(np.load(obs_path), deterministic=True)[0]
print(json.dumps({
    "actions": actions.tolist(),
    "type": type(expert).__name__,
    "name": expert.name,
    "shared": expert is unwrap(model.policy.q_net_target.vlm_model) and expert is model.policy_kwargs["vlm_model"],
    "registry_calls": built,
    "plugin_imported": "sb3_safe_save_test_plugin" in sys.modules,
}))
"""


@pytest.mark.parametrize("route", ["registry", "entry_point", "spec"])
def test_fresh_process_rebuilds_expert_without_resources(
    route: str, trained: Any, obs: np.ndarray, expected: np.ndarray, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "agent.safetensors"
    if route == "registry":
        trained.save(path)
        key = "vlm_model"
    elif route == "entry_point":  # the installed test plugin provides the entry point "plugin_expert"
        trained.save(path, resources={"plugin_expert": expert_of(trained)})
        key = "plugin_expert"
    else:  # lang_dqn:build_expert is trusted: CustomDQN.safe_save_trusted names it
        trained.save(
            path, specs={"vlm_model": SPEC.model_copy(update={"fingerprint": {"type": "lang_dqn.UnpicklableExpert"}})}
        )
        key = "vlm_model"
    (ph,) = read_manifest(path).placeholders
    assert ph.key == key and ph.type == "lang_dqn.UnpicklableExpert"
    assert (ph.spec is not None) == (route == "spec")
    np.save(tmp_path / "obs.npy", obs)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests"), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, route, str(path), str(tmp_path / "obs.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "UnpicklableExpert" and out["name"] == NAME and out["shared"]
    assert np.array_equal(np.array(out["actions"]), expected)
    assert out["registry_calls"] == (["vlm_model"] if route == "registry" else [])
    assert out["plugin_imported"] == (route == "entry_point")


def test_same_process_without_any_route_is_missing(trained: Any, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.safetensors"
    trained.save(path)
    with pytest.raises(MissingResourceError) as info:
        CustomDQN.load(path)
    message = str(info.value)
    assert info.value.keys == ["vlm_model"]
    for part in (
        "'vlm_model'",
        "lang_dqn.UnpicklableExpert",
        "policy.q_net.vlm_model",
        NAME,
        "resources=",
        "register_resource",
        "sb3_safe_save.resources",
    ):
        assert part in message, part


# ------------------------------------------------------------------------------------ resolution order
def test_resolution_order(trained: Any, registry: Any, tmp_path: pathlib.Path) -> None:
    """resources= > register_resource (key, then type) > entry point > trusted spec factory."""
    path = tmp_path / "agent.safetensors"
    # key "plugin_expert" has an entry point; the spec is trusted (CustomDQN.safe_save_trusted)
    spec = {"factory": "lang_dqn:build_expert", "kwargs": {"name": "from-spec", "seed": 0}}
    trained.save(path, resources={"plugin_expert": expert_of(trained)}, specs={"plugin_expert": spec})

    assert expert_of(CustomDQN.load(path)).name == NAME  # entry point (reads the hint) beats the spec
    registry(UnpicklableExpert, lambda ph: UnpicklableExpert(name="by-type"))
    assert expert_of(CustomDQN.load(path)).name == "by-type"  # registry (by type) beats the entry point
    registry("plugin_expert", lambda ph: UnpicklableExpert(name="by-key"))
    assert expert_of(CustomDQN.load(path)).name == "by-key"  # by key beats by type
    given = UnpicklableExpert(name="given")
    assert expert_of(CustomDQN.load(path, resources={"plugin_expert": given})) is given
    seen: list[Any] = []
    loaded = CustomDQN.load(
        path, resources={"plugin_expert": factory(lambda ph: seen.append(ph) or UnpicklableExpert(name="made"))}
    )
    assert expert_of(loaded).name == "made" and [p.key for p in seen] == ["plugin_expert"]
    assert seen[0].spec is not None and seen[0].spec.kwargs["name"] == "from-spec"  # factories get the placeholder

    path2 = tmp_path / "spec_only.safetensors"
    trained.save(path2, specs={"vlm_model": spec})
    unregister_resource(UnpicklableExpert)
    assert expert_of(CustomDQN.load(path2)).name == "from-spec"  # nothing else: the trusted spec factory


def test_untrusted_spec_factory_is_never_imported(
    trained: Any, obs: np.ndarray, expected: np.ndarray, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = write_factory_module(tmp_path, monkeypatch)
    ref = f"{module}:build"
    path = tmp_path / "agent.safetensors"
    trained.save(path, specs={"vlm_model": ResourceSpec(factory=ref, kwargs={"name": NAME, "seed": 0})})

    with pytest.raises(MissingResourceError) as info:
        CustomDQN.load(path)
    assert module not in sys.modules  # refused before any import
    message = str(info.value)
    assert ref in message and f"trusted=[{ref!r}]" in message and "'vlm_model'" in message

    loaded = CustomDQN.load(path, trusted=[ref])  # explicitly trusted: now it is imported and called
    assert sys.modules[module].calls == 1
    assert np.array_equal(actions(loaded, obs), expected)


# ------------------------------------------------------------------------------------------------ lazy
def test_lazy_resource_is_built_once_on_first_use_across_threads(
    trained: Any, obs: np.ndarray, expected: np.ndarray, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "agent.safetensors"
    trained.save(path)
    build = Counter()
    loaded = CustomDQN.load(path, resources={"vlm_model": lazy(build)})
    proxy = expert_of(loaded)
    assert isinstance(proxy, LazyResource) and not proxy.is_built and build.calls == 0
    assert proxy is unwrap(loaded.policy.q_net_target.vlm_model) and proxy is loaded.policy_kwargs["vlm_model"]
    actions(loaded, obs, use_expert=False)  # not using the expert does not build it
    assert build.calls == 0 and "not built yet" in repr(proxy)

    for result in race(loaded, obs):
        assert np.array_equal(result, expected)
    assert build.calls == 1 and proxy.is_built
    assert isinstance(proxy.resolve(), UnpicklableExpert) and proxy.name == NAME
    assert np.array_equal(actions(loaded, obs), expected) and build.calls == 1


def test_lazy_spec_is_built_once_on_first_use_across_threads(
    trained: Any, obs: np.ndarray, expected: np.ndarray, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = write_factory_module(tmp_path, monkeypatch)
    ref = f"{module}:build"
    path = tmp_path / "agent.safetensors"
    trained.save(path, specs={"vlm_model": ResourceSpec(factory=ref, kwargs={"name": NAME, "seed": 0}, lazy=True)})

    loaded = CustomDQN.load(path, trusted=[ref])
    assert isinstance(expert_of(loaded), LazyResource) and not expert_of(loaded).is_built
    assert module not in sys.modules  # not even imported during load
    for result in race(loaded, obs):
        assert np.array_equal(result, expected)
    assert sys.modules[module].calls == 1


def test_lazy_spec_wraps_a_registered_factory(trained: Any, registry: Any, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.safetensors"
    trained.save(path, specs={"vlm_model": {"lazy": True}})
    build = Counter()
    registry("vlm_model", build)
    loaded = CustomDQN.load(path)
    assert isinstance(expert_of(loaded), LazyResource) and build.calls == 0
    assert expert_of(loaded).name == NAME and build.calls == 1


def test_loaded_lazy_and_unbound_resources_save_again_unbuilt(trained: Any, tmp_path: pathlib.Path) -> None:
    """Saving a loaded model keeps a stand-in's placeholder (key, type, spec) and does not build it."""
    path = tmp_path / "lazy.safetensors"
    trained.save(path, specs={"vlm_model": SPEC.model_copy(update={"lazy": True})})
    build = Counter()
    CustomDQN.load(path, resources={"vlm_model": lazy(build)}).save(tmp_path / "lazy2")
    assert read_manifest(tmp_path / "lazy2.safetensors").placeholders == read_manifest(path).placeholders
    assert build.calls == 0

    path = tmp_path / "optional.safetensors"
    trained.save(path, optional=["vlm_model"])
    loaded = CustomDQN.load(path)
    assert isinstance(expert_of(loaded), Unbound)
    loaded.save(tmp_path / "optional2")
    assert read_manifest(tmp_path / "optional2.safetensors").placeholders == read_manifest(path).placeholders


# ----------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_mismatch_raises_or_warns(tmp_path: pathlib.Path) -> None:
    model = make_model(NamedExpert("a", seed=1), net_arch=[16])
    path = tmp_path / "agent.safetensors"
    model.save(path, specs={"vlm_model": ResourceSpec(fingerprint={"name": "a", "seed": 1})})
    assert fingerprint_of(NamedExpert("a", seed=1)) == {"name": "a", "seed": 1}

    right = NamedExpert("a", seed=1)
    assert expert_of(CustomDQN.load(path, resources={"vlm_model": right})) is right
    with pytest.raises(ResourceMismatchError, match=r"'vlm_model'.*seed: saved 1, got 2.*strict=False"):
        CustomDQN.load(path, resources={"vlm_model": NamedExpert("a", seed=2)})
    wrong = NamedExpert("b", seed=1)
    with pytest.warns(UserWarning, match=r"name: saved 'a', got 'b'"):
        loaded = CustomDQN.load(path, resources={"vlm_model": wrong}, strict=False)
    assert expert_of(loaded) is wrong

    # a lazy resource is checked when it is built
    loaded = CustomDQN.load(path, resources={"vlm_model": lazy(lambda ph: NamedExpert("b", seed=1))})
    with pytest.raises(ResourceMismatchError):
        expert_of(loaded).resolve()


def test_fingerprint_of_module_counts_parameters(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=8, depth=1)
    n = sum(p.numel() for p in expert.parameters())
    assert fingerprint_of(expert) == {"type": "lang_dqn.ModuleExpert", "num_parameters": n}
    model = make_model(expert, net_arch=[16])
    path = tmp_path / "agent.safetensors"
    model.save(path, specs={"vlm_model": {"fingerprint": {"num_parameters": n}}})
    assert CustomDQN.load(path, resources={"vlm_model": ModuleExpert(width=8, depth=1)})
    with pytest.raises(ResourceMismatchError, match=rf"num_parameters: saved {n}"):
        CustomDQN.load(path, resources={"vlm_model": ModuleExpert(width=16, depth=1)})


# -------------------------------------------------------------------------------------------- optional
@pytest.mark.parametrize("how", ["save", "class"])
def test_optional_resource_may_stay_unbound(how: str, trained: Any, obs: np.ndarray, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.safetensors"
    if how == "save":
        model = trained
        model.save(path, optional=["vlm_model"])
    else:
        model = make_as(OptionalDQN, UnpicklableExpert(name=NAME))
        model.save(path)
    assert read_manifest(path).placeholders[0].optional

    loaded = type(model).load(path, trusted=POLICY)
    assert isinstance(expert_of(loaded), Unbound) and "vlm_model" in repr(expert_of(loaded))
    assert np.array_equal(actions(loaded, obs, use_expert=False), actions(model, obs, use_expert=False))
    with pytest.raises(
        UnresolvedResourceError, match=r"optional resource 'vlm_model'.*lang_dqn.UnpicklableExpert.*resources="
    ):
        actions(loaded, obs, use_expert=True)


def make_as(cls: type[CustomDQN], expert: Any) -> CustomDQN:
    """``make_model`` for a subclass of ``CustomDQN`` (untrained)."""
    return cls(
        CustomDQNPolicy,
        "CartPole-v1",
        policy_kwargs={"vlm_model": expert, "net_arch": [16]},
        learning_starts=50,
        buffer_size=2000,
        seed=0,
    )


# --------------------------------------------------------------------------------------- attaching specs
def test_three_ways_to_attach_a_spec(tmp_path: pathlib.Path) -> None:
    # 1. save(specs=...)
    model = make_model(UnpicklableExpert(name=NAME, seed=0), net_arch=[16])
    model.save(tmp_path / "a", specs={"vlm_model": SPEC})
    assert read_manifest(tmp_path / "a.safetensors").placeholders[0].spec == SPEC
    assert expert_of(CustomDQN.load(tmp_path / "a")).name == NAME

    # 2. class-level safe_save_specs (save(specs=) overrides it)
    declared = make_as(SpecDQN, UnpicklableExpert(name=NAME, seed=0))
    declared.save(tmp_path / "b")
    spec = read_manifest(tmp_path / "b.safetensors").placeholders[0].spec
    assert spec is not None and spec.factory == "lang_dqn:build_expert" and spec.kwargs["name"] == "from-class"
    with pytest.raises(MissingResourceError, match="trusted="):  # a factory needs exact trust: no inherited declaration
        UndeclaredSpecDQN.load(tmp_path / "b", trusted=POLICY)
    loaded = UndeclaredSpecDQN.load(tmp_path / "b", trusted=[*POLICY, "lang_dqn:build_expert"])
    assert expert_of(loaded).name == "from-class"
    assert expert_of(SpecDQN.load(tmp_path / "b", trusted=POLICY)).name == "from-class"  # CustomDQN.safe_save_trusted
    declared.save(tmp_path / "b2", specs={"vlm_model": SPEC})
    assert read_manifest(tmp_path / "b2.safetensors").placeholders[0].spec == SPEC

    # 3. the resource's own __sb3_resource_spec__
    own = make_model(NamedExpert("self-described", seed=3), net_arch=[16])
    own.save(tmp_path / "c")
    spec = read_manifest(tmp_path / "c.safetensors").placeholders[0].spec
    assert spec == ResourceSpec(factory="lang_dqn:build_expert", kwargs={"name": "self-described", "seed": 3})
    rebuilt = expert_of(CustomDQN.load(tmp_path / "c"))
    assert rebuilt.name == "self-described" and rebuilt is not expert_of(own)
    assert th_equal(rebuilt._bias, expert_of(own)._bias)


def th_equal(a: Any, b: Any) -> bool:
    return bool((a == b).all())


def test_spec_kwargs_must_be_json() -> None:
    with pytest.raises(ValueError, match="must be JSON"):
        ResourceSpec(factory="lang_dqn:build_expert", kwargs={"dtype": np.dtype("float32")})


# ---------------------------------------------------------------------------------------------- warnings
def test_resources_matching_no_placeholder_warn(trained: Any, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.safetensors"
    trained.save(path)
    with pytest.raises(MissingResourceError) as info:  # a typo: said in the error, which names the close key
        CustomDQN.load(path, resources={"vlm_modle": expert_of(trained)})
    assert info.value.keys == ["vlm_model"]
    assert "(did you mean 'vlm_model'? resources= has 'vlm_modle')" in str(info.value)
    assert "Pass them at load: CustomDQN.load(path, resources={'vlm_model': <vlm_model>})" in str(info.value)
    with pytest.warns(UserWarning, match=r"resources \['other'\] match no placeholder in the file \(it has \['vlm_model'\]\)"):
        CustomDQN.load(path, resources={"vlm_model": expert_of(trained), "other": 1})


def test_specs_or_optional_matching_no_resource_warn_at_save(trained: Any, tmp_path: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match=r"\['typo'\], which match no resource in the model"):
        trained.save(tmp_path / "agent", specs={"typo": SPEC})
    with pytest.warns(UserWarning, match=r"\['other'\], which match no resource"):
        trained.save(tmp_path / "agent", optional=["other"])


def test_build_expert_factory() -> None:
    assert isinstance(build_expert(name="x", seed=1), UnpicklableExpert)
    a, b = build_expert("module", seed=5, width=8), build_expert("module", seed=5, width=8)
    assert isinstance(a, ModuleExpert) and all(
        bool((x == y).all()) for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="unknown expert kind"):
        build_expert("nope")
