"""The walker: turns a live SB3 model into a ``Snapshot`` (manifest parts + tensors to write).

It visits what SB3's own ``save`` would write, in the same way SB3 chooses it:

1. the attributes of ``model.__dict__`` left after ``_excluded_save_params()``, ``exclude``/``include``
   and the first components of ``_get_torch_save_params()``, at any nesting depth;
2. the torch modules named by ``_get_torch_save_params()``: every submodule and the plain
   attributes of every module (``policy.q_net.vlm_model``), then their state dicts;
3. the optimizers and torch variables named there.

Each leaf is JSON, a tensor/array (written to the body), a codec node, or a **placeholder**: an
object held through ``external()`` (anywhere in the model: the object itself is a placeholder at every
path, wrapped or not), an external ``nn.Module`` (it came from outside, e.g. through ``policy_kwargs``),
an object that cannot be pickled, an object larger than ``max_object_bytes``, or a resource the user
declared. Placeholders are deduplicated by identity (of the object behind a wrapper): one object found at
three paths is one placeholder with three paths.
The parameters of an external module are never read: the walk costs O(objects), not O(bytes).

Values that fit none of these are collected and reported together (``UnsupportedObjectError``), unless
``allow_pickle`` lets them be cloudpickled into the file, visibly marked as such.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save._codecs import SCHEDULE_NAMES, NotEncodable, codec_for, sample_schedule
from sb3_safe_save._deferred import DeferredOptimizer
from sb3_safe_save._errors import UnsupportedObjectError
from sb3_safe_save._external import External, unwrap
from sb3_safe_save._hazards import find_hazards
from sb3_safe_save._manifest import (
    Hazard,
    ModuleState,
    Node,
    OptimizerState,
    PickleNode,
    Placeholder,
    PlaceholderNode,
    RandomState,
    ResourceSpec,
)
from sb3_safe_save._resources import standin_placeholder
from sb3_safe_save._trust import TrustList, ref_of

DEFAULT_MAX_OBJECT_BYTES = 16 * 1024 * 1024
_MAX_DEPTH = 100
_MODULE_INTERNALS = frozenset(th.nn.Module().__dict__) | {"_compiled_call_impl"}
# weakref.ref: derived caches the constructor rebuilds, e.g. nn.LSTM's ``_flat_weight_refs`` (RecurrentPPO)
_SKIP_IN_MODULES = (
    th.Tensor, th.nn.Module, th.optim.Optimizer, type, np.ndarray, np.generic, spaces.Space, th.device, th.dtype, weakref.ref,
)  # fmt: skip
_HINT_ATTRS = ("name_or_path", "_name_or_path", "model_name", "model", "name")


@dataclass
class Snapshot:
    """Everything the walker found; ``_save`` turns it into a manifest and a file."""

    data: dict[str, Node]
    state_dicts: list[ModuleState | OptimizerState]
    torch_variables: dict[str, Node]
    placeholders: list[Placeholder]
    tensors: dict[str, th.Tensor | np.ndarray]
    hazards: list[Hazard]
    random_state: RandomState | None = None  # filled by ``_persist.snapshot_model`` (``_rng.capture``)


@dataclass
class _Found:
    key: str
    obj: Any
    reason: str
    paths: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    detail: str = ""
    optional: bool = False
    spec: ResourceSpec | None = None
    external_paths: list[str] = field(default_factory=list)


def excluded_names(model: BaseAlgorithm, exclude: Any, include: Any) -> tuple[set[str], list[str], list[str]]:
    """SB3's rule for what ``save`` leaves out of ``data``: ``(excluded, state_dict names, torch variable names)``."""
    excluded = set([] if exclude is None else exclude).union(model._excluded_save_params())
    if include is not None:
        excluded = excluded.difference(include)
    state_dicts, torch_vars = model._get_torch_save_params()
    for name in [*state_dicts, *torch_vars]:
        excluded.add(name.split(".")[0])
    return excluded, list(state_dicts), list(torch_vars)


def resolve_attr(root: Any, path: str) -> Any:
    """Follow ``a.b[c]``-style paths through attributes and mapping keys (for declared resources)."""
    obj = root
    for part in re.findall(r"[^.\[\]]+", path):
        if isinstance(obj, Mapping) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.lstrip("-").isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


class Walker:
    """Walks one model once. Implements the ``Encoder`` protocol the codecs call back into.

    :param allow_pickle: cloudpickle values no codec handles instead of failing
    :param max_object_bytes: objects whose pickle would exceed this become ``too_large`` placeholders
    :param declared: resource key -> live object to treat as a placeholder wherever it appears
    :param specs: resource key -> ``ResourceSpec`` (how to rebuild it at load)
    :param optional: resource keys that may stay unbound at load
    :param trusted: classes whose plain objects may be stored field by field (``ObjectNode``)
    """

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        declared: Mapping[str, Any] | None = None,
        specs: Mapping[str, ResourceSpec] | None = None,
        optional: frozenset[str] = frozenset(),
        trusted: TrustList | None = None,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.max_object_bytes = max_object_bytes
        self._trusted = trusted or TrustList(None)
        self._specs = dict(specs or {})
        self._optional = optional
        self._found: dict[int, _Found] = {}
        self._keys: set[str] = set()
        self._active: set[int] = set()
        self.tensors: dict[str, th.Tensor | np.ndarray] = {}
        self.problems: list[tuple[str, str, str]] = []
        self._wrapped: set[int] = set()  # ids of the objects behind external() wrappers in the module trees
        for key, obj in (declared or {}).items():
            self._found[id(unwrap(obj))] = _Found(key=key, obj=unwrap(obj), reason="declared")
            self._keys.add(key)

    # ---------------------------------------------------------------------------- whole model
    def walk(self, model: BaseAlgorithm, exclude: Any = None, include: Any = None) -> Snapshot:
        excluded, state_names, var_names = excluded_names(model, exclude, include)
        modules: list[tuple[str, th.nn.Module]] = []
        optimizers: list[tuple[str, th.optim.Optimizer]] = []
        for name in state_names:
            obj = resolve_attr(model, name)
            if isinstance(obj, DeferredOptimizer):  # loaded with training=False: save a fresh optimizer (it warns)
                obj = obj.materialize()
            if isinstance(obj, th.optim.Optimizer):
                optimizers.append((name, obj))
            else:
                modules.append((name, getattr(obj, "_orig_mod", obj)))
        for _, module in modules:  # before the data: a wrapped object in policy_kwargs is the same placeholder
            for m in module.modules():
                for attr, value in m.__dict__.items():
                    if attr not in _MODULE_INTERNALS:
                        _find_wrapped(value, self._wrapped, 0)

        data = {k: v for k, v in model.__dict__.items() if k not in excluded}
        nodes = {name: self.encode(value, name) for name, value in data.items()}

        external_prefixes: dict[str, list[str]] = {}
        for name, module in modules:
            external_prefixes[name] = self._walk_module_tree(module, name)
        external_modules = [f.obj for f in self._found.values() if isinstance(f.obj, th.nn.Module)]
        external_params = {id(p) for obj in external_modules for p in _tensors_of(obj)[0]}

        entries: list[ModuleState | OptimizerState] = []
        for name, module in modules:
            entries.append(self._module_state(name, module, external_prefixes[name]))
        hazards: list[Hazard] = []
        for name, opt in optimizers:
            entry = self._optimizer_state(name, opt, external_params)
            entries.append(entry)
            if entry.dropped:
                hazards.append(
                    Hazard(
                        code="external_in_optimizer",
                        severity="warning",
                        message=f"optimizer {name!r} holds {len(entry.dropped)} parameters of external resources;"
                        " their optimizer state is not saved and they may be updated by training (a module that"
                        " holds a resource through sb3_safe_save.external() keeps it out of parameters())",
                        paths=[name],
                    )
                )
        torch_variables = {name: self.encode(resolve_attr(model, name), name) for name in var_names}
        if self.problems:
            raise UnsupportedObjectError(self.problems)
        placeholders = [self._placeholder(f) for f in self._found.values() if f.paths]
        hazards.extend(_hazards(model, list(self._found.values())))
        return Snapshot(nodes, entries, torch_variables, placeholders, self.tensors, hazards)

    # ---------------------------------------------------------------------------- Encoder protocol
    def encode(self, value: Any, path: str) -> Node:
        if value is None or type(value) in (bool, int, str):
            return value  # type: ignore[no-any-return]
        if type(value) is float and math.isfinite(value):
            return value
        if type(value) is External:
            return self._external(value, path)
        found = self._found.get(id(value))
        if found is not None:
            found.paths.append(path)
            return PlaceholderNode(key=found.key)
        origin = standin_placeholder(value)
        if origin is not None:  # a lazy/unbound resource of a loaded model: the same placeholder again, not built
            return self._new_placeholder(value, path, origin.reason, key=origin.key)
        if id(value) in self._wrapped:  # held through external() in a module: a resource here too
            return self._new_placeholder(value, path, "external")
        if isinstance(value, th.nn.Module):
            return self._new_placeholder(value, path, "external_module")
        if id(value) in self._active or path.count(".") + path.count("[") > _MAX_DEPTH:
            self.problems.append((path, _type_name(value), "cyclic or too deeply nested"))
            return None
        codec = codec_for(value)
        detail = "no codec for this type"
        if codec is not None:
            self._active.add(id(value))
            try:
                return codec.encode(value, path, self)
            except NotEncodable as e:
                detail = str(e)
            finally:
                self._active.discard(id(value))
        return self._fallback(value, path, detail)

    def add_tensor(self, key: str, value: th.Tensor | np.ndarray) -> str:
        self.tensors[key] = value
        return key

    def object_allowed(self, cls: type) -> bool:
        try:
            return self._trusted.why(ref_of(cls), "object") is not None
        except TypeError:
            return False

    # ---------------------------------------------------------------------------- helpers
    def _fallback(self, value: Any, path: str, detail: str) -> Node:
        if is_schedule(value, path):
            try:
                return sample_schedule(value, _type_name(value) if not hasattr(value, "__qualname__") else _fn_name(value))
            except NotEncodable as e:
                if not self.allow_pickle:  # exact or not at all: the user supplies it again at load
                    return self._new_placeholder(value, path, "schedule", detail=f"{e}; {_SCHEDULE_HELP}")
                detail = str(e)
        error, size = probe_pickle(value, self.max_object_bytes)
        if error is not None:
            return self._new_placeholder(value, path, "unpicklable", detail=error)
        if size is None:
            return self._new_placeholder(
                value, path, "too_large", detail=f"pickles to more than {self.max_object_bytes} bytes"
            )
        if not self.allow_pickle:
            self.problems.append((path, _type_name(value), detail))
            return None
        payload = np.frombuffer(cloudpickle.dumps(value), dtype=np.uint8)
        return PickleNode(tensor=self.add_tensor(path + "#pickle", payload), type=_type_name(value))

    def _external(self, wrapper: External[Any], path: str) -> PlaceholderNode:
        obj = unwrap(wrapper)
        found = self._found.get(id(obj))
        if found is None:
            origin = standin_placeholder(obj)  # external(lazy stand-in) of a loaded model: keep its key
            self._new_placeholder(obj, path, "external", key=None if origin is None else origin.key)
            found = self._found[id(obj)]
        else:
            found.paths.append(path)
        found.external_paths.append(path)
        return PlaceholderNode(key=found.key)

    def _new_placeholder(
        self, value: Any, path: str, reason: str, detail: str = "", key: str | None = None
    ) -> PlaceholderNode:
        key = _unique(key or _key_from_path(path), self._keys)
        self._keys.add(key)
        self._found[id(value)] = _Found(key=key, obj=value, reason=reason, paths=[path], detail=detail)
        return PlaceholderNode(key=key)

    def _placeholder(self, f: _Found) -> Placeholder:
        obj = f.obj
        origin = standin_placeholder(obj)
        if origin is not None:  # never touch a stand-in: that would build a lazy one or raise for an unbound one
            optional = origin.optional or f.key in self._optional
            spec = self._specs.get(f.key) or origin.spec
            fields = {"key": f.key, "paths": f.paths, "optional": optional, "spec": spec, "external_paths": f.external_paths}
            return Placeholder(**{**dict(origin), **fields})
        hint: dict[str, Any] = {}
        size = None
        if isinstance(obj, th.nn.Module):
            n_params = 0
            size = 0
            params, buffers = _tensors_of(obj)
            for t in [*params, *buffers]:
                size += t.numel() * t.element_size()
                n_params += t.numel() if isinstance(t, th.nn.Parameter) else 0
            hint["num_parameters"] = n_params
            first = params[0] if params else None
            if first is not None:
                hint["dtype"] = str(first.dtype).removeprefix("torch.")
                hint["device"] = str(first.device)
        for attr in _HINT_ATTRS:
            v = getattr(obj, attr, None) if not isinstance(obj, (dict, list, tuple)) else None
            if isinstance(v, str) and len(v) < 300:
                hint[attr.lstrip("_")] = v
                break
        if f.detail:
            hint["detail"] = f.detail[:300]
        spec = self._specs.get(f.key) or _own_spec(obj)
        return Placeholder(
            key=f.key,
            paths=f.paths,
            type=_type_name(obj),
            reason=f.reason,  # type: ignore[arg-type]
            size_bytes=size,
            hint=hint,
            optional=f.key in self._optional,
            spec=spec,
            external_paths=f.external_paths,
        )

    def _walk_module_tree(self, root: th.nn.Module, name: str) -> list[str]:
        """Find placeholders inside the module tree; return the state-dict prefixes they cover."""
        prefixes: list[str] = []
        stack: list[tuple[th.nn.Module, str, str]] = [(root, name, "")]
        while stack:
            module, path, rel = stack.pop()
            found = self._found.get(id(module)) if rel else None
            if found is not None or (rel and id(module) in self._wrapped):
                if found is None:  # registered here, held through external() elsewhere
                    self._new_placeholder(module, path, "external")
                else:
                    found.paths.append(path)
                prefixes.append(rel + ".")
                continue
            for attr, value in module.__dict__.items():
                if attr not in _MODULE_INTERNALS:
                    self._scan_attr(value, f"{path}.{attr}", 0)
            for child_name, child in reversed(module._modules.items()):
                if child is not None:
                    stack.append((child, f"{path}.{child_name}", f"{rel}.{child_name}" if rel else child_name))
        return prefixes

    def _scan_attr(self, value: Any, path: str, depth: int) -> None:
        """Plain module attributes are rebuilt by the constructor; only live resources need recording."""
        if value is None or type(value) in (bool, int, float, str):
            return
        if type(value) is External:
            self._external(value, path)
            return
        found = self._found.get(id(value))
        if found is not None:
            found.paths.append(path)
            return
        origin = standin_placeholder(value)
        if origin is not None:
            self._new_placeholder(value, path, origin.reason, key=origin.key)
            return
        if id(value) in self._wrapped:
            self._new_placeholder(value, path, "external")
            return
        if isinstance(value, _SKIP_IN_MODULES) or (callable(value) and codec_for(value) is not None):
            return
        if isinstance(value, (list, tuple, dict)):
            if depth < 4:
                items = value.items() if isinstance(value, dict) else enumerate(value)
                for k, v in items:
                    self._scan_attr(v, f"{path}[{k}]", depth + 1)
            return
        if codec_for(value) is not None:
            return
        error, size = probe_pickle(value, self.max_object_bytes)
        if error is not None:
            self._new_placeholder(value, path, "unpicklable", detail=error)
        elif size is None:
            self._new_placeholder(value, path, "too_large", detail=f"pickles to more than {self.max_object_bytes} bytes")

    def _module_state(self, name: str, module: th.nn.Module, external: list[str]) -> ModuleState:
        keys: list[str] = []
        aliases: dict[str, str] = {}
        seen: dict[tuple[Any, ...], str] = {}
        for key, tensor in module.state_dict().items():
            if any(key.startswith(p) for p in external):
                continue
            path = f"{name}.{key}"
            if tensor.device.type == "meta":
                self.problems.append(
                    (path, "meta tensor", "a meta-device tensor has no data; declare its module as a resource")
                )
                continue
            signature = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.device,
            )
            if tensor.numel() and signature in seen:
                aliases[key] = seen[signature]
                continue
            seen[signature] = key
            keys.append(key)
            self.add_tensor(f"{name}/{key}", tensor)
        return ModuleState(name=name, keys=keys, aliases=aliases, external_prefixes=external)

    def _optimizer_state(self, name: str, opt: th.optim.Optimizer, external_params: set[int]) -> OptimizerState:
        flat = [p for group in opt.param_groups for p in group["params"]]
        dropped = [i for i, p in enumerate(flat) if id(p) in external_params]
        state_dict = opt.state_dict()
        if dropped:
            drop = set(dropped)
            state_dict = {**state_dict, "state": {i: s for i, s in state_dict["state"].items() if i not in drop}}
        return OptimizerState(name=name, state=self.encode(state_dict, name), dropped=dropped)


# --------------------------------------------------------------------------------------------- probe
class _LimitReached(Exception):
    pass


class _CountingSink:
    """A write-only file that counts bytes and stops the pickler once ``limit`` is passed."""

    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit

    def write(self, data: bytes | memoryview) -> int:
        n = memoryview(data).nbytes
        self.count += n
        if self.count > self.limit:
            raise _LimitReached
        return n


def probe_pickle(value: Any, limit: int) -> tuple[str | None, int | None]:
    """Would ``value`` pickle, and how big? ``(error, None)``, ``(None, None)`` if over ``limit``, else ``(None, size)``.

    The pickle stream goes to a counting sink and is never held in memory.
    """
    sink = _CountingSink(limit)
    try:
        cloudpickle.CloudPickler(sink, protocol=5).dump(value)
    except _LimitReached:
        return None, None
    except Exception as e:  # any failure to pickle means "unpicklable"
        return f"{type(e).__name__}: {e}", None
    return None, sink.count


# ------------------------------------------------------------------------------------------ helpers
def _tensors_of(module: th.nn.Module) -> tuple[list[th.Tensor], list[th.Tensor]]:
    """``(list(module.parameters()), list(module.buffers()))`` in the same order, in one pass over the modules.

    ``parameters()`` resumes a chain of generators per tensor: on a 100-layer external model that cost
    milliseconds per call, twice per save. Only the module tree is walked here, never the tensor bytes.
    """
    params: dict[int, th.Tensor] = {}
    buffers: dict[int, th.Tensor] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                params.setdefault(id(p), p)
        for b in m._buffers.values():
            if b is not None:
                buffers.setdefault(id(b), b)
    return list(params.values()), list(buffers.values())


_SCHEDULE_HELP = "load needs it again: custom_objects={attribute: schedule} for each path, or resources={key: schedule}"


def is_schedule(value: Any, path: str) -> bool:
    """A callable (not a class) under one of SB3's schedule attribute names: the only values sampled at save."""
    last = re.findall(r"[^.\[\]]+", path)[-1]
    return last in SCHEDULE_NAMES and callable(value) and not isinstance(value, type)


def _fn_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', None)}.{fn.__qualname__}"


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _key_from_path(path: str) -> str:
    last = re.findall(r"[^.\[\]]+", path)[-1]
    key = re.sub(r"\W", "_", last).strip("_") or "resource"
    return key[:100]


def _unique(key: str, used: set[str]) -> str:
    if key not in used:
        return key
    n = 2
    while f"{key}_{n}" in used:
        n += 1
    return f"{key}_{n}"


def _own_spec(obj: Any) -> ResourceSpec | None:
    """A resource can describe how to rebuild itself with ``__sb3_resource_spec__() -> dict | ResourceSpec``."""
    method = getattr(type(obj), "__sb3_resource_spec__", None)
    if method is None:
        return None
    spec = method(obj)
    return spec if isinstance(spec, ResourceSpec) else ResourceSpec.model_validate(spec)


def _find_wrapped(value: Any, out: set[int], depth: int) -> None:
    """Collect the ids of objects behind ``external()`` wrappers in a module attribute (and its containers)."""
    if type(value) is External:
        out.add(id(unwrap(value)))
    elif isinstance(value, (list, tuple, dict)) and depth < 4:
        for v in value.values() if isinstance(value, dict) else value:
            _find_wrapped(v, out, depth + 1)


def _hazards(model: BaseAlgorithm, resources: list[_Found]) -> list[Hazard]:
    """The hazards ``_hazards.find_hazards`` finds from facts about the live model, as the manifest records them."""
    modules = {id(f.obj): (f.key, f.obj) for f in resources if isinstance(f.obj, th.nn.Module)}
    return [
        Hazard(code=h.code, severity=h.severity, message=h.message, paths=h.paths)  # type: ignore[arg-type]
        for h in find_hazards(model, modules)
    ]
