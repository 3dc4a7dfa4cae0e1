"""A real transformers model as the seed scenario's expert: a tiny GPT-2 built from a config (nothing is downloaded).

Importable by a fresh process (``PYTHONPATH=examples:tests:src``). ``GPT2QNetwork`` holds the expert the
way ``lang_dqn`` does (``external()``); ``NaiveGPT2QNetwork`` the way a user naturally writes it
(``self.vlm_model = vlm_model``: a registered submodule of both ``q_net`` and ``q_net_target``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network, even by accident

from typing import Any

import torch as th
from transformers import GPT2Config, GPT2LMHeadModel

from lang_dqn import CustomDQN, CustomDQNPolicy, LangQNetwork
from sb3_safe_save import unwrap

N_ACTIONS = 2
VOCAB = 64


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 32 wide, 64 tokens: 28 parameter tensors (29 in its state dict: ``lm_head`` is tied), in eval mode."""
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )  # fmt: skip
    with th.random.fork_rng(devices=[]):
        th.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.eval()


def tokens(observation: th.Tensor) -> th.Tensor:
    """CartPole observations as token ids: each of the 4 features quantised to one of 64 tokens."""
    return ((observation.clamp(-3.2, 3.1) * 10).round().long() + 32).clamp(0, VOCAB - 1)


class GPT2QNetwork(LangQNetwork):
    """The expert's log-probabilities are its next-token distribution over the first ``N_ACTIONS`` tokens."""

    def query_expert(self, observation: th.Tensor) -> th.Tensor:
        with th.no_grad():
            logits = self.vlm_model(input_ids=tokens(observation)).logits[:, -1, :N_ACTIONS]
        return th.log_softmax(logits, dim=1)


class NaiveGPT2QNetwork(GPT2QNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vlm_model = unwrap(self.vlm_model)  # registered: what `self.vlm_model = vlm_model` does


class GPT2DQNPolicy(CustomDQNPolicy):
    q_net_class: type[LangQNetwork] = GPT2QNetwork

    def make_q_net(self) -> LangQNetwork:
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        net_args["vlm_model"] = self._vlm_model
        net_args["vlm_model_name"] = self._vlm_model_name
        return self.q_net_class(**net_args).to(self.device)


class NaiveGPT2DQNPolicy(GPT2DQNPolicy):
    q_net_class = NaiveGPT2QNetwork


def make_gpt2_model(expert: Any, *, naive: bool = False, seed: int = 0) -> CustomDQN:
    """The seed scenario's DQN (hard target update every 50 steps) with the GPT-2 expert consulted while acting."""
    model = CustomDQN(
        NaiveGPT2DQNPolicy if naive else GPT2DQNPolicy, "CartPole-v1",
        policy_kwargs={"vlm_model": expert, "vlm_model_name": "tiny-gpt2", "net_arch": [16]},
        learning_starts=50, buffer_size=1000, target_update_interval=50, train_freq=4, seed=seed, device="cpu",
    )  # fmt: skip
    model.policy.set_use_expert(True)
    return model


def q_values(model: CustomDQN, obs: Any) -> th.Tensor:
    """The Q-network's values plus the expert's log-probabilities: what ``_predict`` ranks."""
    q_net = model.policy.q_net
    x = th.as_tensor(obs, dtype=th.float32)
    with th.no_grad():
        return q_net(x) + q_net.query_expert(x)
