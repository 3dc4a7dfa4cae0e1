"""The seed scenario written the way a user naturally writes it: ``self.vlm_model = vlm_model``.

An ``nn.Module`` expert is then registered in both ``q_net`` and ``q_net_target``: its weights are in
``parameters()`` and the optimizer, and DQN's target update zeroes them. The hazard tests need this
variant; ``examples/lang_dqn.py`` holds the expert through ``external()`` instead.
"""

from __future__ import annotations

from typing import Any

import pytest

from lang_dqn import CustomDQN, CustomDQNPolicy, LangQNetwork
from sb3_safe_save import HazardWarning, unwrap


class NaiveLangQNetwork(LangQNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vlm_model = unwrap(self.vlm_model)  # an nn.Module expert becomes a registered submodule


class NaiveDQNPolicy(CustomDQNPolicy):
    def make_q_net(self) -> LangQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        net_args["vlm_model"] = self._vlm_model
        net_args["vlm_model_name"] = self._vlm_model_name
        return NaiveLangQNetwork(**net_args).to(self.device)


def make_naive_model(expert: Any, net_arch: list[int] | None = None, seed: int = 0, **kwargs: Any) -> CustomDQN:
    """``lang_dqn.make_model`` with the naive policy."""
    policy_kwargs: dict[str, Any] = {"vlm_model": expert, "vlm_model_name": getattr(expert, "name", "expert")}
    if net_arch is not None:
        policy_kwargs["net_arch"] = net_arch
    with pytest.warns(HazardWarning) as caught:  # said at once, when the model is built
        model = CustomDQN(
            NaiveDQNPolicy, "CartPole-v1", policy_kwargs=policy_kwargs, learning_starts=50, buffer_size=2000,
            target_update_interval=50, seed=seed, **kwargs,
        )  # fmt: skip
    assert any(str(w.message).startswith("shared_with_target (found when the model was built)") for w in caught)
    return model
