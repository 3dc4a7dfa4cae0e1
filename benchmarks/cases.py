"""The benchmark cases: which model, how many repetitions, which methods."""

from __future__ import annotations

from dataclasses import dataclass

from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save import safe

SAVE_METHODS = ("sb3", "st", "st_nofsync", "torch", "ours", "ours_nofsync")
LOAD_METHODS = ("sb3", "st", "torch", "ours")
LABELS = {
    "sb3": "SB3 save/load (zip, no fsync)",
    "st": "safetensors save_file+fsync / load_file+load_state_dict",
    "st_nofsync": "safetensors save_file (no fsync)",
    "torch": "torch.save+fsync / torch.load+load_state_dict",
    "ours": "sb3_safe_save (fsync, checksums verified)",
    "ours_nofsync": "sb3_safe_save save(fsync=False)",
}


@dataclass(frozen=True)
class Case:
    name: str
    algo: str  # PPO, SAC or DQN (the core scenario's CustomDQN)
    n_params: int = 0  # PPO / SAC only
    expert: str = ""  # DQN only: none, 200MB, 7B
    sb3: bool = True  # run stock SB3 save/load on it

    @property
    def is_rl(self) -> bool:
        return self.algo in ("PPO", "SAC")


def model_class(case_name: str) -> type[BaseAlgorithm]:
    if case_name.startswith("PPO"):
        return safe(PPO)
    if case_name.startswith("SAC"):
        return safe(SAC)
    from lang_dqn import CustomDQN

    assert issubclass(CustomDQN, DQN)
    return CustomDQN


def cases(quick: bool) -> list[Case]:
    sizes = [1_000_000, 10_000_000] if quick else [1_000_000, 10_000_000, 50_000_000]
    out = [Case(f"{algo}-{n // 1_000_000}M", algo, n_params=n) for algo in ("PPO", "SAC") for n in sizes]
    if quick:
        out = [c for c in out if c.name in ("PPO-1M", "PPO-10M")]
    out += [
        Case("DQN-no-expert", "DQN", expert="none"),
        Case("DQN-200MB-expert", "DQN", expert="200MB", sb3=not quick),
        Case("DQN-7B-meta-expert", "DQN", expert="7B", sb3=False),
    ]
    return [c for c in out if c.name != "DQN-no-expert"] if quick else out


def reps_for(case: Case, quick: bool) -> int:
    if quick:
        return 3
    return 3 if case.n_params >= 50_000_000 else 4
