"""The scenario from the user write-up (SB3 #2025): a DQN whose Q-network consults a live "expert".

The expert's log-probabilities over actions are added to the Q-values when ``use_expert`` is on.
Two stand-in experts, both deterministic so predictions can be compared exactly:

* ``UnpicklableExpert``: refuses pickling the way vLLM's ``LLM`` does;
* ``ModuleExpert``: an ``nn.Module`` with real weights (or ``meta`` weights for a huge one).

The Q-network holds the expert through ``sb3_safe_save.external()``, the recommended way: a plain
``self.vlm_model = vlm_model`` would register an ``nn.Module`` expert as a submodule of both ``q_net``
and ``q_net_target``, put its weights in the optimizer, and let DQN's target update zero them.

The classes are importable (``lang_dqn``), which is what a fresh process needs to load the agent.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork

from sb3_safe_save import SafeSaveMixin, external


class UnpicklableExpert:
    """Stands in for ``vllm.LLM``: deterministic "log-probabilities", and no pickling."""

    def __init__(self, name: str = "stub-llm-7b", n_actions: int = 2, seed: int = 0) -> None:
        self.name = name
        self.model = name
        self._bias = th.from_numpy(np.random.default_rng(seed).normal(size=n_actions).astype(np.float32))
        self.calls = 0

    def action_logprobs(self, observation: th.Tensor) -> th.Tensor:
        self.calls += 1
        return th.log_softmax(self._bias.to(observation.device) + observation.sum(dim=1, keepdim=True), dim=1)

    def __reduce__(self) -> Any:
        raise TypeError("cannot pickle LLM")

    def __getstate__(self) -> Any:
        raise TypeError("cannot pickle LLM")


class ModuleExpert(th.nn.Module):
    """An ``nn.Module`` expert: a stack of Linear layers (``device="meta"`` builds a weightless giant)."""

    def __init__(
        self, obs_dim: int = 4, n_actions: int = 2, width: int = 64, depth: int = 2, device: str | None = None
    ) -> None:
        super().__init__()
        dims = [obs_dim] + [width] * depth
        self.layers = th.nn.ModuleList(th.nn.Linear(a, b, device=device) for a, b in itertools.pairwise(dims))
        self.head = th.nn.Linear(dims[-1], n_actions, device=device)
        self.name_or_path = f"module-expert-{width}x{depth}"
        for p in self.parameters():
            p.requires_grad_(False)

    def action_logprobs(self, observation: th.Tensor) -> th.Tensor:
        x = observation
        for layer in self.layers:
            x = th.tanh(layer(x))
        return th.log_softmax(self.head(x), dim=1)


class LangQNetwork(QNetwork):
    """QNetwork that can add an expert's log-probabilities to its Q-values."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        vlm_model = kwargs.pop("vlm_model", None)
        vlm_model_name = kwargs.pop("vlm_model_name", None)
        super().__init__(*args, **kwargs)
        # external(): the expert is consulted, not trained. Not a submodule, so it stays out of parameters(),
        # state_dict(), the optimizer, .to() (a weightless meta giant is fine), .train()/.eval() and SB3's
        # target update; self.vlm_model.action_logprobs(...) and self.vlm_model(...) reach the expert.
        self.vlm_model = external(vlm_model)
        self.vlm_model_name = vlm_model_name
        self.use_expert = False

    def query_expert(self, observation: th.Tensor) -> th.Tensor:
        return self.vlm_model.action_logprobs(observation)

    def _predict(self, observation: Any, deterministic: bool = True) -> th.Tensor:
        q_values = self(observation)
        if self.use_expert and self.vlm_model is not None:
            q_values = q_values + self.query_expert(observation.float()).to(q_values.device)
        return q_values.argmax(dim=1).reshape(-1)


class CustomDQNPolicy(DQNPolicy):
    """Pops the expert from ``policy_kwargs`` before ``super().__init__()`` (which calls ``make_q_net``)."""

    def __init__(self, *args: Any, vlm_model: Any = None, vlm_model_name: str | None = None, **kwargs: Any) -> None:
        object.__setattr__(self, "_vlm_model", vlm_model)
        object.__setattr__(self, "_vlm_model_name", vlm_model_name)
        super().__init__(*args, **kwargs)

    def make_q_net(self) -> LangQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        net_args["vlm_model"] = self._vlm_model
        net_args["vlm_model_name"] = self._vlm_model_name
        return LangQNetwork(**net_args).to(self.device)

    def set_use_expert(self, flag: bool) -> None:
        self.q_net.use_expert = flag
        self.q_net_target.use_expert = flag


class CustomDQN(SafeSaveMixin, DQN):
    """The user's DQN, with safe save/load from the mixin.

    ``safe_save_trusted`` names, exactly, what files loaded with this class may reference beyond the
    default list: the resource factory below (CustomDQNPolicy is trusted already: it is a class defined
    in this module, the module of CustomDQN).
    """

    safe_save_trusted = ("lang_dqn:build_expert",)  # a factory is called only when trusted by exact name


def make_model(expert: Any, net_arch: list[int] | None = None, seed: int = 0, **kwargs: Any) -> CustomDQN:
    policy_kwargs: dict[str, Any] = {"vlm_model": expert, "vlm_model_name": getattr(expert, "name", "expert")}
    if net_arch is not None:
        policy_kwargs["net_arch"] = net_arch
    return CustomDQN(
        CustomDQNPolicy, "CartPole-v1", policy_kwargs=policy_kwargs, learning_starts=50, buffer_size=2000,
        target_update_interval=50, seed=seed, **kwargs,
    )  # fmt: skip


def build_expert(kind: str = "unpicklable", **kwargs: Any) -> UnpicklableExpert | ModuleExpert:
    """A module-level factory a ``ResourceSpec`` can name, so load rebuilds the expert by itself.

    ``ResourceSpec(factory="lang_dqn:build_expert", kwargs={"kind": "unpicklable", "name": "stub-llm-7b", "seed": 0})``:
    loading with ``CustomDQN`` may call it, because ``CustomDQN.safe_save_trusted`` names it.

    :param kind: ``"unpicklable"`` (``UnpicklableExpert``) or ``"module"`` (``ModuleExpert``, seeded by ``seed=``)
    :param kwargs: the expert's constructor arguments (JSON values only: they are stored in the file)
    """
    if kind == "unpicklable":
        return UnpicklableExpert(**kwargs)
    if kind == "module":  # seeded without touching the global torch RNG
        seed = kwargs.pop("seed", 0)
        with th.random.fork_rng(devices=[]):
            th.manual_seed(seed)
            return ModuleExpert(**kwargs)
    raise ValueError(f"unknown expert kind {kind!r} (expected 'unpicklable' or 'module')")
