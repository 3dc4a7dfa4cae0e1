"""Optimizers that are built on first use: the evaluation load (``load(..., training=False)``).

Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (and sympy): about a second in a
fresh process, more than reading a 10M-parameter agent. An evaluation script, a CLI or a serving
process never steps the optimizer, so the evaluation load builds the model with ``DeferredOptimizer``
in place of each optimizer:

* the policy's ``optimizer_class`` (the stored one, or the policy class's default) is wrapped while
  ``_setup_model`` runs, then put back, so ``policy.optimizer_class`` and ``policy_kwargs`` stay as stored;
* optimizers that algorithms build by name (SAC's ``ent_coef_optimizer = th.optim.Adam(...)``) are
  caught by swapping the ``torch.optim`` classes for the same short window, under a process-wide lock
  (like ``no_weight_init``). Another thread that builds an optimizer in that window gets a
  ``DeferredOptimizer`` too, which behaves like the real one.

A ``DeferredOptimizer`` records the class, parameters and arguments. The first attribute access
(``learn()`` calls ``zero_grad``/``param_groups``; ``save`` and ``set_parameters`` read the state dict)
builds the real optimizer, with fresh state, and warns once: training after an evaluation load does
not resume the saved optimizer state.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch as th


class DeferredOptimizer:
    """Stands in for an optimizer until it is first used, then forwards everything to the real one.

    :param optimizer_class: the optimizer class to build on first use
    :param params: the parameters (or parameter groups) it optimises
    :param kwargs: its keyword arguments (``lr``, ``optimizer_kwargs``)
    """

    def __init__(self, optimizer_class: type[th.optim.Optimizer], params: Iterable[Any], **kwargs: Any) -> None:
        self.__dict__["_spec"] = (optimizer_class, list(params), kwargs)
        self.__dict__["_real"] = None

    @property
    def deferred_class(self) -> type[th.optim.Optimizer]:
        """The optimizer class this stands in for."""
        cls: type[th.optim.Optimizer] = self._spec[0]
        return cls

    def materialize(self) -> th.optim.Optimizer:
        """Build the real optimizer (once, fresh state, with a warning) and return it."""
        if self._real is None:
            cls, params, kwargs = self._spec
            warnings.warn(
                f"this model was loaded with training=False: its saved {cls.__name__} state was not read, so a fresh"
                f" {cls.__name__} is built now and training does not resume exactly; load with training=True to resume",
                UserWarning,
                stacklevel=3,
            )
            self.__dict__["_real"] = cls(params, **kwargs)
        real: th.optim.Optimizer = self._real
        return real

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_spec", "_real"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.materialize(), name, value)

    def __repr__(self) -> str:
        state = "built" if self._real is not None else "not built yet"
        return f"DeferredOptimizer({self._spec[0].__name__}, {state})"


class _Deferring:
    """Called like an optimizer class, returns a ``DeferredOptimizer`` for it."""

    def __init__(self, cls: type[th.optim.Optimizer]) -> None:
        self.cls = cls

    def __call__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> DeferredOptimizer:
        if args:  # positional lr etc.: bind them by name so the real build gets the same arguments
            bound = inspect.signature(self.cls).bind_partial(params, *args, **kwargs)
            kwargs = {k: v for k, v in bound.arguments.items() if k != "params"}
        return DeferredOptimizer(self.cls, params, **kwargs)


_lock = threading.RLock()


def _optimizer_classes() -> dict[str, type[th.optim.Optimizer]]:
    return {
        name: value
        for name, value in vars(th.optim).items()
        if isinstance(value, type) and issubclass(value, th.optim.Optimizer) and value is not th.optim.Optimizer
    }


def _stored_optimizer_class(model: Any) -> type[th.optim.Optimizer] | None:
    """The optimizer class the policy will be built with: ``policy_kwargs``' or the policy class's default."""
    stored = (getattr(model, "policy_kwargs", None) or {}).get("optimizer_class")
    if isinstance(stored, type) and issubclass(stored, th.optim.Optimizer):
        return stored
    try:
        default = inspect.signature(model.policy_class).parameters["optimizer_class"].default
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, type) and issubclass(default, th.optim.Optimizer) else None


@contextlib.contextmanager
def deferred_optimizers(model: Any) -> Iterator[None]:
    """While active, building ``model`` (``_setup_model``) creates ``DeferredOptimizer`` s instead of optimizers."""
    stored = _stored_optimizer_class(model)
    policy_kwargs = getattr(model, "policy_kwargs", None)
    with _lock:
        originals = _optimizer_classes()
        try:
            for name, cls in originals.items():
                setattr(th.optim, name, _Deferring(cls))
            if stored is not None and isinstance(policy_kwargs, dict):
                model.policy_kwargs = {**policy_kwargs, "optimizer_class": _Deferring(stored)}
            yield
        finally:
            for name, cls in originals.items():
                setattr(th.optim, name, cls)
            if stored is not None and isinstance(policy_kwargs, dict):
                model.policy_kwargs = policy_kwargs
                for module in getattr(getattr(model, "policy", None), "modules", lambda: [])():
                    if isinstance(getattr(module, "optimizer_class", None), _Deferring):
                        module.optimizer_class = stored
