"""The seed user's code (SB3 #2025) as they write it, with only ``SafeSaveMixin`` added.

Importable by a fresh process. The expert is a real tiny GPT-2 (``_gpt2_expert.tiny_gpt2``) passed through
``policy_kwargs``; the Q-network adds its log-probabilities to the Q-values.
"""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3 import DQN
from stable_baselines3.dqn.policies import DQNPolicy, QNetwork

from sb3_safe_save import SafeSaveMixin


def expert_logprobs(expert: Any, obs: th.Tensor) -> th.Tensor:
    ids = ((obs.clamp(-3.2, 3.1) * 10).round().long() + 32).clamp(0, 63)
    with th.no_grad():
        return th.log_softmax(expert(input_ids=ids).logits[:, -1, :2], dim=1)


class CustomQNetwork(QNetwork):
    """``self.vlm_model = vlm_model``: the natural registration (a submodule of q_net and q_net_target)."""

    def __init__(self, *args: Any, vlm_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vlm_model = vlm_model

    def forward(self, obs: th.Tensor) -> th.Tensor:
        return super().forward(obs) + expert_logprobs(self.vlm_model, obs.float())


class ListQNetwork(QNetwork):
    """The expert in a plain list: torch does not register it."""

    def __init__(self, *args: Any, vlm_model: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.experts = [vlm_model]

    def forward(self, obs: th.Tensor) -> th.Tensor:
        return super().forward(obs) + expert_logprobs(self.experts[0], obs.float())


class ModuleListQNetwork(ListQNetwork):
    """The expert in an ``nn.ModuleList``: registered, as the natural assignment."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.experts = th.nn.ModuleList(self.experts)


class CustomDQNPolicy(DQNPolicy):
    q_net_class: type[QNetwork] = CustomQNetwork

    def __init__(self, *args: Any, vlm_model: Any = None, **kwargs: Any) -> None:
        self.vlm_model_ref = [vlm_model]  # before super().__init__(), which calls make_q_net
        super().__init__(*args, **kwargs)

    def make_q_net(self) -> QNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return self.q_net_class(vlm_model=self.vlm_model_ref[0], **net_args).to(self.device)


class ListDQNPolicy(CustomDQNPolicy):
    q_net_class = ListQNetwork


class ModuleListDQNPolicy(CustomDQNPolicy):
    q_net_class = ModuleListQNetwork


class CustomDQN(SafeSaveMixin, DQN):
    pass


class WorkaroundDQN(SafeSaveMixin, DQN):
    """The article's workaround, kept on a SafeSaveMixin class."""

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "policy_kwargs"]


def make(algo: type[DQN], policy: type[DQNPolicy], expert: Any, seed: int = 0) -> Any:
    return algo(
        policy, "CartPole-v1", policy_kwargs={"vlm_model": expert, "net_arch": [16]},
        learning_starts=50, buffer_size=1000, target_update_interval=50, train_freq=4, seed=seed, device="cpu",
    )  # fmt: skip
