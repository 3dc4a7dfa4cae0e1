"""``external(obj)``: a live resource held by a module but kept out of the module system; hazards from facts.

The wrapper itself (registration, forwarding, identity, copy, pickling), the save/load of a model that
holds one, the hazards computed from the live model (no false positives on unregistered experts), and
the ``HazardWarning`` that ``save`` gives once per model. The same with a real transformers model is
in ``test_external_gpt2.py``.
"""

from __future__ import annotations

import copy
import inspect
import io
import pathlib
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO, SAC, TD3
from stable_baselines3.common.callbacks import CheckpointCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.utils import polyak_update

import sb3_safe_save
from _naive import NaiveDQNPolicy, make_naive_model
from lang_dqn import CustomDQN, CustomDQNPolicy, LangQNetwork, ModuleExpert, UnpicklableExpert, make_model
from sb3_safe_save import (
    External,
    HazardError,
    HazardWarning,
    UnsupportedObjectError,
    assert_save_budget,
    audit,
    external,
    read_manifest,
    safe,
    unwrap,
)


class Holder(th.nn.Module):
    def __init__(self, expert: Any) -> None:
        super().__init__()
        self.own = th.nn.Linear(4, 2)
        self.expert = external(expert)


def _weights(module: th.nn.Module) -> dict[str, th.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------ the wrapper
def test_a_module_holding_an_external_does_not_register_it() -> None:
    expert = th.nn.Sequential(th.nn.Linear(4, 3), th.nn.Dropout(0.5)).eval()
    holder = Holder(expert)
    assert "expert" not in holder._modules and isinstance(holder.__dict__["expert"], External)
    assert [n for n, _ in holder.named_parameters()] == ["own.weight", "own.bias"]
    assert list(holder.state_dict()) == ["own.weight", "own.bias"]
    assert "expert" not in dict(holder.named_modules())
    assert {id(p) for p in th.optim.Adam(holder.parameters()).param_groups[0]["params"]}.isdisjoint(
        {id(p) for p in expert.parameters()}
    )
    holder.train()
    assert holder.training and not expert.training  # .train() does not reach it
    holder.to(th.float64)
    assert holder.own.weight.dtype == th.float64 and expert[0].weight.dtype == th.float32  # nor does .to()
    expert.train()
    holder.eval()
    assert expert.training  # nor .eval()


def test_calls_and_attributes_reach_the_real_object() -> None:
    expert = th.nn.Linear(4, 3)
    seen: list[th.Tensor] = []
    expert.register_forward_hook(lambda m, args, out: seen.append(out))
    wrapper = external(expert)
    x = th.randn(2, 4)
    out = wrapper(x)  # the module's __call__: forward and its hooks
    assert th.equal(out, expert(x)) and len(seen) == 2 and th.equal(seen[0], out)
    assert wrapper.weight is expert.weight and wrapper.out_features == 3
    wrapper.note = "set through the wrapper"
    assert expert.note == "set through the wrapper"  # type: ignore[attr-defined]
    del wrapper.note
    assert not hasattr(expert, "note")
    assert "forward" in dir(wrapper)
    assert repr(wrapper) == f"external({expert!r})"
    llm = UnpicklableExpert()
    assert th.equal(external(llm).action_logprobs(x), llm.action_logprobs(x))
    items = external([1, 2, 3])
    assert len(items) == 3 and list(items) == [1, 2, 3] and items[1] == 2 and bool(items)


def test_identity_rules() -> None:
    expert = ModuleExpert()
    wrapper = external(expert)
    assert wrapper is not expert and unwrap(wrapper) is expert and wrapper.__wrapped__ is expert
    assert inspect.unwrap(wrapper) is expert
    assert external(wrapper) is wrapper  # idempotent
    assert external(None) is None  # an optional expert stays None
    assert unwrap(expert) is expert and unwrap(None) is None
    assert isinstance(wrapper, External) and not isinstance(wrapper, th.nn.Module)
    assert not isinstance(wrapper, ModuleExpert)  # isinstance checks need unwrap()
    assert external(expert) == wrapper and external(expert) is not wrapper and hash(external(expert)) == hash(expert)
    assert wrapper == expert and wrapper != ModuleExpert()


def test_copies_share_the_resource_and_pickling_is_refused() -> None:
    expert = ModuleExpert()
    holder = Holder(expert)
    twin = copy.deepcopy(holder)
    assert twin.own is not holder.own and unwrap(twin.expert) is expert  # the live resource is shared, not copied
    assert copy.copy(holder.expert) is holder.expert
    with pytest.raises(UnsupportedObjectError, match=r"external\(\) resource is never pickled") as info:
        pickle.dumps(holder)
    assert "ModuleExpert" in str(info.value) and "placeholder" in str(info.value)
    with pytest.raises(UnsupportedObjectError):
        th.save(holder, io.BytesIO())  # SB3's policy.save() too


# ------------------------------------------------------------------------------------------ save / load
def test_guarded_module_expert_is_untouched_by_training_and_round_trips(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=32)
    before = _weights(expert)
    model = make_model(expert, net_arch=[16])
    model.learn(220)  # hard target updates at 50, 100, 150 and 200
    assert model._n_updates > 0
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error", HazardWarning)
        model.save(tmp_path / "m")
    manifest = read_manifest(tmp_path / "m.safetensors")
    (ph,) = manifest.placeholders
    assert (ph.key, ph.reason, ph.type) == ("vlm_model", "external", "lang_dqn.ModuleExpert")
    assert ph.size_bytes == sum(p.numel() * 4 for p in expert.parameters())
    assert set(ph.external_paths) == {"policy.q_net.vlm_model", "policy.q_net_target.vlm_model"}
    assert "policy_kwargs.vlm_model" in ph.paths and "policy_kwargs.vlm_model" not in ph.external_paths
    assert manifest.hazards == [] and not any("vlm_model" in k for k in manifest.tensors)
    entry = next(e for e in manifest.state_dicts if e.name == "policy")
    assert entry.external_prefixes == []  # nothing to cut out of the state dict: it was never in it

    loaded = CustomDQN.load(tmp_path / "m.safetensors", resources={"vlm_model": expert}, device="cpu")
    assert unwrap(loaded.policy.q_net.vlm_model) is expert and isinstance(loaded.policy.q_net.vlm_model, External)
    assert loaded.policy_kwargs["vlm_model"] is expert
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)


def test_naive_module_expert_is_warned_at_build_and_learn_refuses_before_any_change(tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=32)
    before = _weights(expert)
    model = make_naive_model(expert, net_arch=[16])  # warns shared_with_target at build (asserted in make_naive_model)
    with pytest.raises(HazardError) as info:
        model.learn(60)  # would be one hard target update, at step 50: zeros
    message = str(info.value)
    assert message.startswith("CustomDQN.learn() refused to start, before any gradient step or target update")
    assert "policy.q_net.vlm_model" in message and "tau=1.0" in message
    assert "self.vlm_model = sb3_safe_save.external(vlm_model)" in message
    assert "safe_save_externalize = True in class CustomDQN" in message
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items())  # bitwise unchanged
    assert model.num_timesteps == 0 and model._n_updates == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", HazardWarning)
        model.save(tmp_path / "a")  # warned once per model: at the build, not again at save
        model.save(tmp_path / "b")
    make_naive_model(ModuleExpert(), net_arch=[16])  # another model: warned again (asserted in make_naive_model)


def test_checkpoints_of_a_model_warned_at_build_do_not_warn_again(tmp_path: pathlib.Path) -> None:
    model = make_naive_model(ModuleExpert(width=8), net_arch=[8], tau=0.0)  # tau=0: the target update writes w*1 + 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.learn(160, callback=CheckpointCallback(save_freq=50, save_path=str(tmp_path)))
    assert len(sorted(tmp_path.iterdir())) == 3  # three checkpoints, no warning


@pytest.mark.parametrize("how", ["class", "safe"])
def test_externalize_rewires_the_natural_registration(how: str, tmp_path: pathlib.Path) -> None:
    expert = ModuleExpert(width=16)
    for p in expert.parameters():
        p.requires_grad_(True)  # trainable: it would be in Adam
    before = _weights(expert)

    class Rewired(CustomDQN):
        safe_save_externalize = True

    algo = Rewired if how == "class" else safe(CustomDQN, externalize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the registration was rewired at build
        model = algo(
            NaiveDQNPolicy, "CartPole-v1", policy_kwargs={"vlm_model": expert, "net_arch": [8]},
            learning_starts=50, buffer_size=500, target_update_interval=50, seed=0,
        )  # fmt: skip
    q_net = model.policy.q_net
    assert isinstance(q_net.__dict__["vlm_model"], External) and unwrap(q_net.vlm_model) is expert
    assert "vlm_model" not in dict(model.policy.named_modules()) and "vlm_model" not in q_net._modules
    assert not any(id(p) in _optimizer_ids(model) for p in expert.parameters())
    model.learn(110)  # two hard target updates and gradient steps
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items())
    model.save(tmp_path / "m")
    loaded = algo.load(tmp_path / "m", resources={"vlm_model": expert}, trusted=[NaiveDQNPolicy])
    assert unwrap(loaded.policy.q_net.vlm_model) is expert
    obs = np.zeros((3, 4), dtype=np.float32)
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


def _optimizer_ids(model: Any) -> set[int]:
    return {id(p) for g in model.policy.optimizer.param_groups for p in g["params"]}


def test_resources_object_or_wrapper_at_load_and_attributes_set_after_build_are_not_created(tmp_path: pathlib.Path) -> None:
    expert = UnpicklableExpert()
    wrapper = external(expert)
    model = make_model(wrapper, net_arch=[8])  # here policy_kwargs holds the wrapper too
    model.policy.q_net.extra = external(expert)  # set after construction: load does not create it (issue 22)
    model.save(tmp_path / "m")
    (ph,) = read_manifest(tmp_path / "m.safetensors").placeholders
    assert ph.key == "vlm_model" and "policy_kwargs.vlm_model" in ph.external_paths
    assert "policy.q_net.extra" in ph.external_paths
    for given in (expert, wrapper):
        with pytest.warns(UserWarning, match=r"'vlm_model' at policy\.q_net\.extra\).*set them again after load"):
            loaded = CustomDQN.load(tmp_path / "m.safetensors", resources={"vlm_model": given})
        pk = loaded.policy_kwargs["vlm_model"]
        assert isinstance(pk, External) and unwrap(pk) is expert
        if given is wrapper:
            assert pk is wrapper  # the wrapper given is the wrapper put back
        assert unwrap(loaded.policy.q_net.vlm_model) is expert  # where the constructor put it
        assert "extra" not in loaded.policy.q_net.__dict__  # never created by load


def test_a_wrapped_picklable_object_is_a_placeholder_keyed_by_its_policy_kwargs_name() -> None:
    table = {"temperature": 0.7, "tokens": [1, 2, 3]}  # would be stored as JSON if it were not wrapped
    model = make_model(table, net_arch=[8])
    (ph,) = sb3_safe_save._persist.snapshot_model(model).placeholders
    assert (ph.key, ph.reason, ph.type) == ("vlm_model", "external", "builtins.dict")
    assert "policy_kwargs.vlm_model" in ph.paths and "policy_kwargs.vlm_model" not in ph.external_paths


# ------------------------------------------------------------------------------------- hazards: facts
class InListQNetwork(LangQNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.experts = [unwrap(self.vlm_model)]  # a list: nn.Module does not register what is inside


class ObjectSetattrQNetwork(LangQNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "vlm_model", unwrap(self.vlm_model))


class NoExpertQNetwork(LangQNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["vlm_model"] = None  # the expert stays in policy_kwargs only
        super().__init__(*args, **kwargs)


class _Policy(CustomDQNPolicy):
    q_net_class: type[LangQNetwork] = LangQNetwork

    def make_q_net(self) -> LangQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return self.q_net_class(**net_args, vlm_model=self._vlm_model).to(self.device)


class InListPolicy(_Policy):
    q_net_class = InListQNetwork


class ObjectSetattrPolicy(_Policy):
    q_net_class = ObjectSetattrQNetwork


class NoExpertPolicy(_Policy):
    q_net_class = NoExpertQNetwork


HAZARDS = {"shared_with_target", "external_in_optimizer", "reinitialised_on_build"}


@pytest.mark.parametrize("holding", ["external", "list", "object_setattr", "policy_kwargs_only"])
def test_unregistered_experts_are_no_hazard_and_really_are_safe(holding: str) -> None:
    expert = ModuleExpert(width=16)
    before = _weights(expert)
    if holding == "external":
        model = make_model(expert, net_arch=[8])
    else:
        policy = {"list": InListPolicy, "object_setattr": ObjectSetattrPolicy}.get(holding, NoExpertPolicy)
        model = CustomDQN(
            policy, "CartPole-v1", policy_kwargs={"vlm_model": expert, "net_arch": [8]},
            learning_starts=50, buffer_size=500, target_update_interval=50, seed=0,
        )  # fmt: skip
    report = audit(model, allow_placeholders=["vlm_model"])
    assert [f for f in report.findings if f.code in HAZARDS or f.severity == "error"] == [], report.table()
    assert_save_budget(model, "1 MB", allow_placeholders=["vlm_model"])  # the safe pattern passes the CI check
    model.learn(110)  # two hard target updates
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items())


def test_shared_storage_is_found_whatever_holds_it_and_tau_below_one_is_an_error_too() -> None:
    model = make_naive_model(ModuleExpert(), net_arch=[8], tau=0.5)
    (shared,) = [f for f in audit(model).findings if f.code == "shared_with_target"]
    assert shared.severity == "error" and "tau=0.5" in shared.message and "0.75" in shared.message
    # the message's arithmetic: a tensor polyak-updated with itself shrinks by 1 - tau**2 per update
    w = th.nn.Parameter(th.ones(3))
    polyak_update([w], [w], 0.5)
    assert th.equal(w.data, th.full((3,), 0.75))
    polyak_update([w], [w], 1.0)
    assert th.equal(w.data, th.zeros(3))


def test_a_wrapped_expert_put_in_an_optimizer_by_hand_is_reported() -> None:
    expert = ModuleExpert(width=8)
    model = make_model(expert, net_arch=[8])
    assert "external_in_optimizer" not in {f.code for f in audit(model).findings}
    model.policy.optimizer.add_param_group({"params": list(expert.parameters())})  # the fact, however it came about
    (finding,) = [f for f in audit(model).findings if f.code == "external_in_optimizer"]
    assert finding.severity == "warning" and finding.paths == ["policy.optimizer"]


@pytest.mark.parametrize("algo", [SAC, TD3])
def test_stock_target_networks_share_nothing(algo: Any) -> None:
    model = safe(algo)("MlpPolicy", "Pendulum-v1", policy_kwargs={"net_arch": [8]}, buffer_size=100)
    assert [f for f in audit(model).findings if f.severity != "info"] == []


class PretrainedExtractor(BaseFeaturesExtractor):
    def __init__(self, observation_space: spaces.Box, pretrained: th.nn.Linear) -> None:
        super().__init__(observation_space, features_dim=pretrained.out_features)
        self.pretrained = external(pretrained)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.relu(self.pretrained(observations))


def test_external_in_an_ortho_init_extractor_is_not_reinitialised() -> None:
    pretrained = th.nn.Linear(4, 8)
    before = _weights(pretrained)
    policy_kwargs = {
        "features_extractor_class": PretrainedExtractor,
        "features_extractor_kwargs": {"pretrained": pretrained},
        "net_arch": [8],
        "ortho_init": True,
    }
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=policy_kwargs)
    assert all(th.equal(before[k], v) for k, v in pretrained.state_dict().items())
    report = audit(model, allow_placeholders=True)
    assert [f for f in report.findings if f.code in HAZARDS or f.severity == "error"] == [], report.table()


class NaiveExtractor(PretrainedExtractor):
    def __init__(self, observation_space: spaces.Box, pretrained: th.nn.Linear) -> None:
        super().__init__(observation_space, pretrained)
        self.pretrained = unwrap(self.pretrained)  # registered: ortho_init re-initialises it while the policy is built


def _ortho_kwargs(pretrained: th.nn.Linear) -> dict[str, Any]:
    return {
        "features_extractor_class": NaiveExtractor,
        "features_extractor_kwargs": {"pretrained": pretrained},
        "net_arch": [8],
    }


def test_ortho_init_of_a_registered_resource_is_undone_and_refused() -> None:
    pretrained = th.nn.Linear(4, 8)
    before = _weights(pretrained)
    with pytest.raises(HazardError) as info:
        safe(PPO)("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=_ortho_kwargs(pretrained))
    message = str(info.value)
    assert "reinitialises" not in message and "re-initialises its Linear/Conv2d weights" in message
    assert "Your resource's weights were restored" in message and "safe(PPO, externalize=True)" in message
    assert all(th.equal(before[k], v) for k, v in pretrained.state_dict().items())  # bitwise, as before the build
    # stock PPO, for comparison: the build overwrites the caller's module
    PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=_ortho_kwargs(pretrained))
    assert not th.equal(before["weight"], pretrained.weight)


def test_ortho_init_with_externalize_keeps_the_resource_and_builds() -> None:
    pretrained = th.nn.Linear(4, 8)
    before = _weights(pretrained)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = safe(PPO, externalize=True)(
            "MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs=_ortho_kwargs(pretrained)
        )
    assert all(th.equal(before[k], v) for k, v in pretrained.state_dict().items())
    extractor = model.policy.features_extractor
    assert isinstance(extractor.__dict__["pretrained"], External) and "pretrained" not in extractor._modules
    assert not any(
        id(p) in {id(q) for g in model.policy.optimizer.param_groups for q in g["params"]} for p in pretrained.parameters()
    )
    model.learn(32)
    assert all(th.equal(before[k], v) for k, v in pretrained.state_dict().items())
