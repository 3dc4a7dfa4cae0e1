"""Save and load through each method, on the same tensors.

* ``sb3``: stock ``model.save(zip)`` / ``Algo.load(zip)`` (no fsync: SB3 does not offer one);
* ``st``: ``safetensors.torch.save_file`` of exactly the tensors this library writes, ``+fsync`` of the file
  and its directory for the durable variant; load is ``load_file`` + ``load_state_dict`` into an already
  built model (optimizer state: ``copy_`` into the live Adam tensors, which is what its ``load_state_dict`` ends in);
* ``torch``: ``torch.save`` of the same dict (+fsync) / ``torch.load(weights_only=True)`` + the same copy;
* ``ours``: ``safe(Algo)`` ``save`` (fsync on by default, or ``fsync=False``) / ``load`` (checksums verified).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from safetensors.torch import load_file, save_file
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save import SafeSaveMixin, read_manifest, safe
from sb3_safe_save._persist import snapshot_model

Tensors = dict[str, th.Tensor]


def flat_tensors(model: BaseAlgorithm) -> Tensors:
    """The tensors this library writes for ``model``, as live (shared) torch tensors keyed as in our file."""
    out: Tensors = {}
    for key, value in snapshot_model(model).tensors.items():
        out[key] = th.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.detach()
    return out


def stock_class(cls: type[BaseAlgorithm]) -> type[BaseAlgorithm]:
    """The SB3 class under a ``safe(...)`` / mixin subclass (``Algo.load`` of stock SB3)."""
    for klass in cls.__mro__:
        stock = klass.__module__.startswith("stable_baselines3.") and not issubclass(klass, SafeSaveMixin)
        if stock and issubclass(klass, BaseAlgorithm):
            return klass
    raise TypeError(cls)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable(path: Path) -> None:
    fsync_path(path)
    fsync_path(path.parent)


def copy_into(model: BaseAlgorithm, targets: Tensors, loaded: Mapping[str, th.Tensor]) -> None:
    """``policy.load_state_dict`` for the policy's tensors, ``copy_`` into the live tensors for the rest."""
    policy = {k.removeprefix("policy/"): v for k, v in loaded.items() if k.startswith("policy/")}
    if policy:
        model.policy.load_state_dict(policy, strict=False)
    with th.no_grad():
        for key, value in loaded.items():
            if not key.startswith("policy/"):
                targets[key].copy_(value)


def resources_for(path: Path, expert: Any) -> dict[str, Any]:
    return {ph.key: expert for ph in read_manifest(path).placeholders} if expert is not None else {}


def save_fn(method: str, model: BaseAlgorithm, tensors: Tensors, path: Path) -> Callable[[], None]:
    if method == "sb3":
        return lambda: BaseAlgorithm.save(model, path)  # the stock method, not the mixin's
    if method == "st":
        return lambda: (save_file(tensors, path), durable(path))[-1]
    if method == "st_nofsync":
        return lambda: save_file(tensors, path)
    if method == "torch":
        return lambda: (th.save(tensors, path), durable(path))[-1]
    if method == "ours":
        return lambda: model.save(path)  # type: ignore[call-arg]
    if method == "ours_nofsync":
        return lambda: model.save(path, fsync=False)  # type: ignore[call-arg]
    raise ValueError(method)


def load_fn(
    method: str, cls: type[BaseAlgorithm], path: Path, expert: Any = None, model: BaseAlgorithm | None = None
) -> Callable[[], Any]:
    """``cls`` is the stock SB3 class or a ``SafeSaveMixin`` subclass; raw methods load into ``model``."""
    if method == "sb3":
        return lambda: stock_class(cls).load(path, device="cpu")
    if method == "ours":
        ours = cls if hasattr(cls, "safe_save_resources") else safe(cls)
        resources = resources_for(path, expert)
        return lambda: ours.load(path, device="cpu", resources=resources)  # type: ignore[attr-defined]
    assert model is not None, "raw loads need a built model to load into"
    targets = flat_tensors(model)
    if method == "st":
        return lambda: copy_into(model, targets, load_file(path))
    if method == "torch":
        return lambda: copy_into(model, targets, th.load(path, weights_only=True))
    raise ValueError(method)


SUFFIX = {"sb3": ".zip", "st": ".st.safetensors", "st_nofsync": ".st.safetensors", "torch": ".pt"}


def file_for(method: str, stem: Path) -> Path:
    return stem.with_name(stem.name + SUFFIX.get(method, ".safetensors"))
