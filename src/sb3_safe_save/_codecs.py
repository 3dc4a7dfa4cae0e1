"""Codecs: how each family of Python values becomes a manifest node and back.

One class per type family; each keeps its ``encode`` next to its ``decode``. ``CODECS`` is the one
table: the walker asks it for the first codec whose ``handles`` accepts a value, and the loader looks a
node's codec up by its ``kind``. A codec never pickles and never imports: references are resolved by
the decoder, which only ever imports what the trust list allowed.

A codec may raise ``NotEncodable`` from ``encode`` (a dict with mixed key types, a function that
cannot be found again by its import path, an object of a class nobody trusted); the walker then
treats the value as it treats any value without a codec (placeholder, explicit pickle or an error).
"""

from __future__ import annotations

import bisect
import collections
import enum
import inspect
import itertools
import math
import re
import types
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common import utils as sb3_utils

from sb3_safe_save._errors import FormatError
from sb3_safe_save._manifest import (
    ArrayNode,
    DequeNode,
    DeviceNode,
    DictNode,
    EnumNode,
    FloatNode,
    ListNode,
    NamedTupleNode,
    Node,
    NumpyDtypeNode,
    NumpyScalarNode,
    ObjectNode,
    PickleNode,
    PlaceholderNode,
    RefNode,
    ScheduleNode,
    SpaceNode,
    TensorNode,
    TorchDtypeNode,
    TupleNode,
    check_ref,
    child_path,
)
from sb3_safe_save._trust import LOCALS, RefKind, plain_class, ref_of, resolves_to


class NotEncodable(Exception):
    """Raised by a codec's ``encode`` when it recognises the type but cannot encode this value."""


class Encoder(Protocol):
    """What codecs need from the walker while saving."""

    def encode(self, value: Any, path: str) -> Node: ...

    def add_tensor(self, key: str, value: th.Tensor | np.ndarray) -> str: ...

    def object_allowed(self, cls: type) -> bool: ...


class Decoder(Protocol):
    """What codecs need from the loader."""

    def decode(self, node: Node, path: str) -> Any: ...

    def tensor(self, key: str) -> th.Tensor: ...

    def resolve(self, ref: str, path: str, kind: RefKind) -> Any: ...

    def placeholder(self, key: str, path: str) -> Any: ...

    def unpickle(self, node: PickleNode, path: str) -> Any: ...

    def charge(self, nbytes: int, path: str) -> None:
        """Account for ``nbytes`` a decoded value allocates from sizes declared in JSON; raises past the budget."""


# --------------------------------------------------------------------------------- safe dtype tables
_NP_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
              np.float16, np.float32, np.float64)
}  # fmt: skip
_TORCH_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (th.float64, th.float32, th.float16, th.bfloat16, th.int64, th.int32, th.int16, th.int8, th.uint8, th.bool)
}


def np_dtype(text: str) -> np.dtype[Any]:
    try:
        return _NP_DTYPES[text]
    except KeyError:
        raise FormatError(f"numpy dtype {text!r} is not allowed in a file (allowed: {sorted(_NP_DTYPES)})") from None


def _scalar_out(x: float) -> float | Literal["nan", "inf", "-inf"]:
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))


def _scalar_in(x: object) -> object:
    return float(x) if isinstance(x, str) else x


# ------------------------------------------------------------------------------------------ codecs
class Codec:
    kind: ClassVar[str]

    def handles(self, value: Any) -> bool:
        raise NotImplementedError

    def encode(self, value: Any, path: str, enc: Encoder) -> Node:
        raise NotImplementedError

    def decode(self, node: Any, path: str, dec: Decoder) -> Any:
        raise NotImplementedError


class FloatCodec(Codec):
    """Non-finite Python floats (finite ones are plain JSON)."""

    kind = "float"

    def handles(self, value: Any) -> bool:
        return type(value) is float and not math.isfinite(value)

    def encode(self, value: float, path: str, enc: Encoder) -> Node:
        return FloatNode(value=_scalar_out(value))  # type: ignore[arg-type]

    def decode(self, node: FloatNode, path: str, dec: Decoder) -> float:
        return float(node.value)


class EnumCodec(Codec):
    kind = "enum"

    def handles(self, value: Any) -> bool:
        return isinstance(value, enum.Enum)

    def encode(self, value: enum.Enum, path: str, enc: Encoder) -> Node:
        ref = _ref(type(value))
        if not isinstance(value.value, (type(None), bool, int, float, str)):
            raise NotEncodable(f"enum value of type {type(value.value).__name__} is not a JSON scalar")
        return EnumNode(cls=ref, value=value.value)

    def decode(self, node: EnumNode, path: str, dec: Decoder) -> Any:
        cls = dec.resolve(node.cls, path, "enum")
        if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
            raise FormatError(f"{path}: {node.cls} is not an Enum")
        return cls(node.value)


class NamedTupleCodec(Codec):
    """Named tuples such as SB3's ``TrainFreq``; rebuilt with ``cls(**fields)``."""

    kind = "namedtuple"

    def handles(self, value: Any) -> bool:
        return isinstance(value, tuple) and hasattr(type(value), "_fields")

    def encode(self, value: Any, path: str, enc: Encoder) -> Node:
        ref = _ref(type(value))
        fields = {f: enc.encode(getattr(value, f), child_path(path, f)) for f in type(value)._fields}
        return NamedTupleNode(cls=ref, fields=fields)

    def decode(self, node: NamedTupleNode, path: str, dec: Decoder) -> Any:
        cls = dec.resolve(node.cls, path, "namedtuple")
        if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
            raise FormatError(f"{path}: {node.cls} is not a named tuple class")
        if set(node.fields) != set(cls._fields):
            raise FormatError(f"{path}: fields {sorted(node.fields)} do not match {node.cls} fields {list(cls._fields)}")
        return cls(**{k: dec.decode(v, child_path(path, k)) for k, v in node.fields.items()})


class ListCodec(Codec):
    kind = "list"

    def handles(self, value: Any) -> bool:
        return type(value) is list

    def encode(self, value: list[Any], path: str, enc: Encoder) -> Node:
        return ListNode(items=[enc.encode(v, child_path(path, i)) for i, v in enumerate(value)])

    def decode(self, node: ListNode, path: str, dec: Decoder) -> list[Any]:
        return [dec.decode(v, child_path(path, i)) for i, v in enumerate(node.items)]


class TupleCodec(Codec):
    kind = "tuple"

    def handles(self, value: Any) -> bool:
        return type(value) is tuple

    def encode(self, value: tuple[Any, ...], path: str, enc: Encoder) -> Node:
        return TupleNode(items=[enc.encode(v, child_path(path, i)) for i, v in enumerate(value)])

    def decode(self, node: TupleNode, path: str, dec: Decoder) -> tuple[Any, ...]:
        return tuple(dec.decode(v, child_path(path, i)) for i, v in enumerate(node.items))


class DictCodec(Codec):
    """``dict`` and ``OrderedDict`` with all-``str`` or all-``int`` keys."""

    kind = "dict"

    def handles(self, value: Any) -> bool:
        return type(value) in (dict, collections.OrderedDict)

    def encode(self, value: dict[Any, Any], path: str, enc: Encoder) -> Node:
        if all(type(k) is str for k in value):
            key_type = "str"
        elif all(type(k) is int for k in value):
            key_type = "int"
        else:
            raise NotEncodable("dict keys must be all str or all int")
        items = {str(k): enc.encode(v, child_path(path, k)) for k, v in value.items()}
        return DictNode(items=items, key_type=key_type, ordered=type(value) is collections.OrderedDict)  # type: ignore[arg-type]

    def decode(self, node: DictNode, path: str, dec: Decoder) -> dict[Any, Any]:
        out: dict[Any, Any] = collections.OrderedDict() if node.ordered else {}
        for k, v in node.items.items():
            key: Any = k
            if node.key_type == "int":
                try:
                    key = int(k)
                except ValueError:
                    raise FormatError(f"{path}: dict key {k!r} is not an integer") from None
            out[key] = dec.decode(v, child_path(path, key))
        return out


class DequeCodec(Codec):
    """``collections.deque``, e.g. SB3's episode-info buffers."""

    kind = "deque"

    def handles(self, value: Any) -> bool:
        return type(value) is collections.deque

    def encode(self, value: collections.deque[Any], path: str, enc: Encoder) -> Node:
        return DequeNode(items=[enc.encode(v, child_path(path, i)) for i, v in enumerate(value)], maxlen=value.maxlen)

    def decode(self, node: DequeNode, path: str, dec: Decoder) -> collections.deque[Any]:
        return collections.deque((dec.decode(v, child_path(path, i)) for i, v in enumerate(node.items)), maxlen=node.maxlen)


class ArrayCodec(Codec):
    """numpy arrays of numeric or bool dtype; the bytes go to the tensor body."""

    kind = "ndarray"

    def handles(self, value: Any) -> bool:
        return type(value) is np.ndarray

    def encode(self, value: np.ndarray, path: str, enc: Encoder) -> Node:
        dtype = value.dtype.newbyteorder("=") if value.dtype.byteorder not in "=|" else value.dtype
        if dtype.str not in _NP_DTYPES:
            raise NotEncodable(f"numpy dtype {value.dtype} has no safetensors equivalent")
        key = enc.add_tensor(path, value.astype(dtype, copy=False))
        return ArrayNode(tensor=key, dtype=value.dtype.str, shape=list(value.shape))

    def decode(self, node: ArrayNode, path: str, dec: Decoder) -> np.ndarray:
        # np.dtype() parses arbitrary strings ("05a2,..." goes through ast.literal_eval): check the shape first
        if not re.fullmatch(r"[<>|=][biuf][1248]", node.dtype):
            raise FormatError(f"{path}: {node.dtype!r} is not an allowed numpy dtype")
        dtype = np.dtype(node.dtype)
        if dtype.newbyteorder("=").str not in _NP_DTYPES:
            raise FormatError(f"{path}: numpy dtype {node.dtype!r} is not allowed")
        arr = dec.tensor(node.tensor).numpy()
        if arr.dtype != dtype.newbyteorder("=") or list(arr.shape) != node.shape:
            raise FormatError(
                f"{path}: tensor {node.tensor!r} is {arr.dtype} {list(arr.shape)}, expected {node.dtype} {node.shape}"
            )
        return arr.astype(dtype, copy=False)


class NumpyScalarCodec(Codec):
    kind = "np_scalar"

    def handles(self, value: Any) -> bool:
        return isinstance(value, np.generic) and np.dtype(type(value)).str in _NP_DTYPES

    def encode(self, value: np.generic, path: str, enc: Encoder) -> Node:
        py: Any = value.item()
        return NumpyScalarNode(dtype=value.dtype.str, value=_scalar_out(py) if isinstance(py, float) else py)

    def decode(self, node: NumpyScalarNode, path: str, dec: Decoder) -> np.generic:
        return np_dtype(node.dtype).type(_scalar_in(node.value))  # type: ignore[no-any-return]


class NumpyDtypeCodec(Codec):
    kind = "np_dtype"

    def handles(self, value: Any) -> bool:
        return isinstance(value, np.dtype)

    def encode(self, value: np.dtype[Any], path: str, enc: Encoder) -> Node:
        if value.str not in _NP_DTYPES:
            raise NotEncodable(f"numpy dtype {value} is not supported")
        return NumpyDtypeNode(value=value.str)

    def decode(self, node: NumpyDtypeNode, path: str, dec: Decoder) -> np.dtype[Any]:
        return np_dtype(node.value)


class TensorCodec(Codec):
    """torch tensors outside the state dicts (optimizer state, torch variables, attributes)."""

    kind = "tensor"

    def handles(self, value: Any) -> bool:
        return isinstance(value, th.Tensor)

    def encode(self, value: th.Tensor, path: str, enc: Encoder) -> Node:
        if value.is_sparse or value.device.type == "meta":
            raise NotEncodable(f"{'sparse' if value.is_sparse else 'meta-device'} tensors cannot be stored")
        return TensorNode(tensor=enc.add_tensor(path, value), requires_grad=value.requires_grad)

    def decode(self, node: TensorNode, path: str, dec: Decoder) -> th.Tensor:
        t = dec.tensor(node.tensor)
        return t.requires_grad_(node.requires_grad) if t.is_floating_point() else t


class TorchDeviceCodec(Codec):
    kind = "device"

    def handles(self, value: Any) -> bool:
        return isinstance(value, th.device)

    def encode(self, value: th.device, path: str, enc: Encoder) -> Node:
        return DeviceNode(value=str(value))

    def decode(self, node: DeviceNode, path: str, dec: Decoder) -> th.device:
        return decode_device(node.value, path)


def decode_device(value: str, path: str) -> th.device:
    """The device a file names at ``path``; decided from the text alone, so load's phase 2 refuses it too."""
    try:
        device = th.device(value)
    except (RuntimeError, ValueError):
        raise FormatError(f"{path}: {value!r} is not a torch device") from None
    if device.type not in DEVICE_TYPES:  # "meta" builds a model that loads and then cannot run
        raise FormatError(f"{path}: device {value!r} is not allowed in a file (types: {sorted(DEVICE_TYPES)})")
    return device


#: Device types a file may name (a stored device never decides where the model runs: ``load(device=)`` does).
DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})


class TorchDtypeCodec(Codec):
    kind = "torch_dtype"

    def handles(self, value: Any) -> bool:
        return isinstance(value, th.dtype)

    def encode(self, value: th.dtype, path: str, enc: Encoder) -> Node:
        name = str(value).removeprefix("torch.")
        if name not in _TORCH_DTYPES:
            raise NotEncodable(f"torch dtype {value} is not supported")
        return TorchDtypeNode(name=name)

    def decode(self, node: TorchDtypeNode, path: str, dec: Decoder) -> th.dtype:
        try:
            return _TORCH_DTYPES[node.name]
        except KeyError:
            raise FormatError(f"{path}: torch dtype {node.name!r} is not allowed") from None


_RNGS = {"PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"}
MAX_SPACE_ELEMENTS = 2**26  # 67M elements: far above any image observation


def generator_state(rng: np.random.Generator | None) -> dict[str, Any] | None:
    """A numpy generator's state as JSON (``bit_generator`` name plus its state), or None; see ``decode_generator``."""
    if rng is None:
        return None
    state = rng.bit_generator.state
    return _jsonable(state)  # type: ignore[no-any-return]


def decode_generator(state: dict[str, Any], path: str) -> np.random.Generator:
    """The generator ``generator_state`` describes; ``FormatError`` (naming ``path``) for an unknown or invalid one."""
    name = state.get("bit_generator")
    if not isinstance(name, str) or name not in _RNGS:
        raise FormatError(f"{path}: unknown bit generator {name!r}")
    bitgen = getattr(np.random, name)()
    try:
        bitgen.state = _unjsonable(state)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise FormatError(f"{path}: invalid RNG state: {e}") from None
    return np.random.Generator(bitgen)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return {"__array__": x.tolist(), "dtype": x.dtype.str}
    if isinstance(x, np.generic):
        return x.item()
    return x


def _unjsonable(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__array__", "dtype"}:
            return np.asarray(x["__array__"], dtype=np_dtype(x["dtype"]))
        return {k: _unjsonable(v) for k, v in x.items()}
    return x


class SpaceCodec(Codec):
    """gymnasium spaces, rebuilt from their constructor arguments and, if seeded, their RNG state."""

    kind = "space"
    _ARGS: ClassVar[dict[type, tuple[str, ...]]] = {
        spaces.Box: ("low", "high", "shape", "dtype"),
        spaces.Discrete: ("n", "start"),
        spaces.MultiDiscrete: ("nvec", "dtype", "start"),
        spaces.MultiBinary: ("n",),
        spaces.Dict: ("spaces",),
        spaces.Tuple: ("spaces",),
    }

    def handles(self, value: Any) -> bool:
        return type(value) in self._ARGS

    def encode(self, value: spaces.Space[Any], path: str, enc: Encoder) -> Node:
        names = self._ARGS[type(value)]
        args = {n: enc.encode(getattr(value, n), child_path(path, n)) for n in names}
        return SpaceNode(space=type(value).__name__, args=args, rng=generator_state(value._np_random))  # type: ignore[arg-type]

    def decode(self, node: SpaceNode, path: str, dec: Decoder) -> spaces.Space[Any]:
        cls = getattr(spaces, node.space)
        expected = self._ARGS[cls]
        if set(node.args) != set(expected):
            raise FormatError(f"{path}: a {node.space} space takes {list(expected)}, the file gives {sorted(node.args)}")
        args = {k: dec.decode(v, child_path(path, k)) for k, v in node.args.items()}
        shape = args.get("shape")
        if cls is spaces.Box and isinstance(shape, (tuple, list)):
            # Box fills low/high arrays (and two bool masks) of this shape: account before allocating
            if not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
                raise FormatError(f"{path}: a Box shape must be non-negative integers, got {shape!r:.200}")
            elements = math.prod(shape)
            if elements > MAX_SPACE_ELEMENTS:
                raise FormatError(f"{path}: a {node.space} space of shape {shape} has over {MAX_SPACE_ELEMENTS} elements")
            dec.charge(elements * 18, path)  # low and high (8 bytes at most each), bounded_below and bounded_above
        try:
            space = cls(**args)
        except (TypeError, ValueError, AssertionError) as e:
            raise FormatError(f"{path}: cannot rebuild the {node.space} space: {e}") from None
        if node.rng is not None:
            space._np_random = decode_generator(node.rng, path)
        return space  # type: ignore[no-any-return]


class RefCodec(Codec):
    """Classes and module-level functions, stored as ``"module:qualname"``."""

    kind = "ref"

    def handles(self, value: Any) -> bool:
        return isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType))

    def encode(self, value: Any, path: str, enc: Encoder) -> Node:
        return RefNode(ref=_ref(value))

    def decode(self, node: RefNode, path: str, dec: Decoder) -> Any:
        return dec.resolve(node.ref, path, "ref")


class ObjectCodec(Codec):
    """Plain objects of trusted classes (SB3 schedules, action noise, ...): ``__new__`` + ``__dict__``.

    Only classes with the default pickling behaviour qualify (no ``__reduce__``, ``__getstate__``,
    ``__setstate__`` or ``__slots__`` of their own), so the ``__dict__`` is the whole state.
    """

    kind = "object"

    def handles(self, value: Any) -> bool:
        return hasattr(value, "__dict__") and plain_class(type(value))

    def encode(self, value: Any, path: str, enc: Encoder) -> Node:
        cls = type(value)
        if not enc.object_allowed(cls):
            raise NotEncodable(f"{cls.__module__}.{cls.__qualname__} is not a trusted class")
        state = vars(value)
        bad = [k for k in state if not (isinstance(k, str) and k.isidentifier()) or k.startswith("__")]
        if bad:
            raise NotEncodable(f"attribute names {bad} cannot be stored")
        return ObjectNode(cls=_ref(cls), state={k: enc.encode(v, child_path(path, k)) for k, v in state.items()})

    def decode(self, node: ObjectNode, path: str, dec: Decoder) -> Any:
        kind = schedule_class_missing(node.cls)
        if kind is not None:  # saved with SB3 >= 2.7, loaded with an older SB3: the same schedule, as that SB3 builds it
            return BY_KIND["schedule"].decode(ScheduleNode(schedule=kind, args=node.state), path, dec)  # type: ignore[arg-type]
        cls = dec.resolve(node.cls, path, "object")  # a trusted plain class: no constructor, no custom __dict__
        check_object_state(cls, node, path)
        state = {k: dec.decode(v, child_path(path, k)) for k, v in node.state.items()}
        obj: Any = object.__new__(cls)
        object.__getattribute__(obj, "__dict__").update(state)
        return obj


# ---------------------------------------------------------------------------------------- schedules
def _inner_code(fn: Callable[..., Any], name: str) -> types.CodeType | None:
    """The code object of the function ``fn`` defines as ``name`` (read from its constants, never called)."""
    return next((c for c in fn.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == name), None)


#: SB3's schedule closures (before SB3 2.7 every default model holds them), by the code object of the
#: function they return: schedule kind -> (code, the closure's free variables in ``args`` order).
#: Only these exact code objects are stored as their cell values; any other closure is not.
_SB3_CLOSURES: dict[str, tuple[types.CodeType | None, tuple[str, ...]]] = {
    "constant": (_inner_code(sb3_utils.constant_fn, "func"), ("val",)),
    "linear": (_inner_code(sb3_utils.get_linear_fn, "func"), ("start", "end", "end_fraction")),
    "float": (_inner_code(sb3_utils.get_schedule_fn, "<lambda>"), ("value_schedule",)),
}
_BY_CODE = {code: (kind, names) for kind, (code, names) in _SB3_CLOSURES.items() if code is not None}
#: SB3 >= 2.7's schedule classes: their fields are the closures' parameters above.
_SB3_CLASSES = {"ConstantSchedule": "constant", "LinearSchedule": "linear", "FloatSchedule": "float"}

#: Attribute names that hold schedules: only a callable found under one of these is ever called (sampled) at save.
SCHEDULE_NAMES = frozenset(
    {"learning_rate", "lr_schedule", "clip_range", "clip_range_vf", "exploration_schedule", "value_schedule",
     "delta_std", "delta_std_schedule"}
)  # fmt: skip
#: ``sample_schedule``'s grid: progress_remaining = i / GRID for i in [-GRID, GRID], the midpoints of
#: every cell, and these points outside it. Training queries 1 - num_timesteps / total_timesteps:
#: within (0, 1] while it runs, below 0 for the last rollout when n_steps * n_envs overshoots the total.
GRID = 1000
_OUTSIDE = (-1000.0, -10.0, -2.0, -1.5, 1.5, 2.0)
#: Largest accepted deviation of the rebuilt schedule from the original, relative to its largest sampled value.
SAMPLE_RTOL = 1e-12


class PiecewiseLinearSchedule:
    """A schedule rebuilt from ``knots``: linear between them, extended linearly beyond the ends.

    It returns the stored value exactly at every knot. Loading a ``piecewise_linear`` schedule gives one;
    saving it again stores the same knots.

    :param knots: ``(progress_remaining, value)`` pairs, progress strictly increasing, at least two
    :param source: the name of the function it was sampled from (for ``repr`` only)
    """

    def __init__(
        self, knots: list[tuple[float, float]], source: str | None = None, checked_points: int = 0, max_error: float = 0.0
    ) -> None:
        self.knots = [(float(x), float(y)) for x, y in knots]
        self.source = source
        self.checked_points = checked_points
        self.max_error = max_error
        self._xs = [x for x, _ in self.knots]

    def __call__(self, progress_remaining: float) -> float:
        p = float(progress_remaining)
        i = min(max(bisect.bisect_right(self._xs, p) - 1, 0), len(self.knots) - 2)
        (x0, y0), (x1, y1) = self.knots[i], self.knots[i + 1]
        if p == x0:
            return y0
        if p == x1:
            return y1
        return y0 + (p - x0) * (y1 - y0) / (x1 - x0)

    def __repr__(self) -> str:
        return f"PiecewiseLinearSchedule({len(self.knots)} knots, sampled from {self.source})"


def _value(fn: Callable[[float], Any], p: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SB3's deprecation warnings from a wrapped schedule
        y = float(fn(p))
    if not math.isfinite(y):
        raise ValueError(f"it returns {y} at progress_remaining={p}")
    return y


def sample_schedule(fn: Callable[[float], Any], source: str) -> ScheduleNode:
    """Store a schedule function as the knots of a piecewise-linear function that reproduces it.

    ``fn`` is sampled at progress_remaining = i/GRID for i in [-GRID, GRID]. Samples that lie on the line
    through their neighbours are dropped (0 and 1 are always kept, so ``lambda p: p * lr`` is rebuilt
    bit for bit); the result is then compared with ``fn`` at every sample, at the midpoint of every
    cell and at points outside [-1, 1]. It is accepted only if it deviates nowhere by more than
    ``SAMPLE_RTOL`` times the largest sampled magnitude: constant, linear and piecewise-linear
    schedules whose kinks lie on the grid (rl-zoo3's ``linear_schedule``, ``lambda p: p * 3e-4``) pass;
    curves (cosine, exponential) and steps or kinks off the grid do not, and raise ``NotEncodable``.
    Between checked points nothing is evaluated: a function that is linear at 6000 points and
    something else in between is not told apart.

    :param fn: the schedule, called with floats only
    :param source: what to call it in the manifest
    :return: a ``piecewise_linear`` node
    """
    xs = [i / GRID for i in range(-GRID, GRID + 1)]
    try:
        ys = [_value(fn, x) for x in xs]
        checks = [(x, _value(fn, x)) for x in [*((a + b) / 2 for a, b in itertools.pairwise(xs)), *_OUTSIDE]]
    except Exception as e:  # a schedule that fails on some progress value cannot be sampled
        raise NotEncodable(f"sampling the schedule failed: {type(e).__name__}: {e}") from None
    keep = {i for i in range(len(xs)) if xs[i] in (0.0, 1.0) or not _collinear(xs, ys, i)}
    scale = max(abs(y) for y in ys)
    tol = SAMPLE_RTOL * scale
    # fewest knots first: the kinks (extended beyond them), the kinks and the ends, every sample
    for indices in (sorted(keep), sorted(keep | {0, len(xs) - 1}), range(len(xs))):
        rebuilt = PiecewiseLinearSchedule([(xs[i], ys[i]) for i in indices])
        error = max(abs(rebuilt(x) - y) for x, y in [*zip(xs, ys, strict=True), *checks])
        if error <= tol:
            return ScheduleNode(
                schedule="piecewise_linear", knots=rebuilt.knots, source=source[:500], checked_points=len(xs) + len(checks),
                max_error=error,
            )  # fmt: skip
    bad = [(x, y) for x, y in checks if abs(rebuilt(x) - y) > tol]
    x, y = next((c for c in bad if -1 <= c[0] <= 1), bad[0])
    raise NotEncodable(
        f"the schedule is not piecewise linear on a 1/{GRID} grid: at progress_remaining={x:g} it returns"
        f" {y:.6g}, interpolating its samples gives {rebuilt(x):.6g}"
    )


def _collinear(xs: list[float], ys: list[float], i: int) -> bool:
    """True if sample ``i`` lies on the line through its two nearest neighbours (to rounding)."""
    j, k = (i + 1, i + 2) if i == 0 else (i - 2, i - 1) if i == len(xs) - 1 else (i - 1, i + 1)
    (x0, y0), (x, y), (x1, y1) = (xs[j], ys[j]), (xs[i], ys[i]), (xs[k], ys[k])
    expected = y0 + (x - x0) * (y1 - y0) / (x1 - x0)
    return abs(expected - y) <= SAMPLE_RTOL * max(abs(y0), abs(y), abs(y1))


class ScheduleCodec(Codec):
    """Functions: SB3's own schedule closures as their parameters; other module-level functions as references.

    Also ``PiecewiseLinearSchedule`` (a sampled schedule, loaded back), stored as the same knots.
    Sampling other schedule functions is the walker's decision (it calls user code): see ``sample_schedule``.
    """

    kind = "schedule"

    def handles(self, value: Any) -> bool:
        return isinstance(value, (types.FunctionType, PiecewiseLinearSchedule))

    def encode(self, value: Any, path: str, enc: Encoder) -> Node:
        if isinstance(value, PiecewiseLinearSchedule):
            return ScheduleNode(
                schedule="piecewise_linear", knots=value.knots, source=value.source, checked_points=value.checked_points,
                max_error=value.max_error,
            )  # fmt: skip
        kind = _sb3_kind(value)
        if kind is None:
            return RefNode(ref=_ref(value))
        names = _SB3_CLOSURES[kind][1]
        values = _cells(value, names)
        if kind == "float":  # float(float(x)) is float(x): unwrap as FloatSchedule does (SB3 < 2.7 wraps at every load)
            inner = values["value_schedule"]
            while _sb3_kind(inner) == "float" or isinstance(inner, getattr(sb3_utils, "FloatSchedule", ())):
                inner = (
                    _cells(inner, names)["value_schedule"] if isinstance(inner, types.FunctionType) else inner.value_schedule
                )
            values["value_schedule"] = inner
        return ScheduleNode(
            schedule=kind,  # type: ignore[arg-type]
            args={n: enc.encode(values[n], child_path(path, n)) for n in names},
        )

    def decode(self, node: ScheduleNode, path: str, dec: Decoder) -> Any:
        if node.schedule == "piecewise_linear":
            xs = [x for x, _ in node.knots]
            if len(xs) < 2 or any(not math.isfinite(v) for k in node.knots for v in k) or xs != sorted(set(xs)):
                raise FormatError(f"{path}: a piecewise_linear schedule needs at least two finite knots in increasing order")
            return PiecewiseLinearSchedule(list(node.knots), node.source, node.checked_points, node.max_error)
        names = _SB3_CLOSURES[node.schedule][1]
        if set(node.args) != set(names) or node.knots:
            raise FormatError(f"{path}: a {node.schedule} schedule takes {list(names)}, the file gives {sorted(node.args)}")
        args = [dec.decode(node.args[n], child_path(path, n)) for n in names]
        if node.schedule == "float":
            if not callable(args[0]):
                raise FormatError(f"{path}: the schedule wrapped by a float schedule is a {type(args[0]).__name__}")
        elif not all(isinstance(a, (int, float, np.integer, np.floating)) and not isinstance(a, bool) for a in args):
            raise FormatError(f"{path}: a {node.schedule} schedule takes numbers, the file gives {args!r:.200}")
        return _sb3_schedule(node.schedule, args)


def schedule_class_missing(ref: str) -> str | None:
    """The schedule kind if ``ref`` names an SB3 >= 2.7 schedule class the installed SB3 lacks, else None.

    Such an object is rebuilt as the installed SB3's closure from its fields: nothing is imported, so
    the reference needs no trust.
    """
    module, _, name = ref.partition(":")
    return (
        _SB3_CLASSES[name] if module == sb3_utils.__name__ and name in _SB3_CLASSES and not hasattr(sb3_utils, name) else None
    )


def _sb3_kind(fn: Any) -> str | None:
    """``constant``, ``linear`` or ``float`` if ``fn`` is one of SB3's schedule closures, else None."""
    found = _BY_CODE.get(fn.__code__) if isinstance(fn, types.FunctionType) else None
    return None if found is None else found[0]


def _cells(fn: types.FunctionType, names: tuple[str, ...]) -> dict[str, Any]:
    """The values of an SB3 closure's free variables."""
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
    if set(cells) != set(names):
        raise NotEncodable(f"an SB3 schedule closure with free variables {sorted(cells)}, expected {sorted(names)}")
    return {n: cells[n].cell_contents for n in names}


def _sb3_schedule(kind: str, args: list[Any]) -> Any:
    """The schedule as the installed SB3 builds it: its classes from 2.7 on, its closures before."""
    classes = {"constant": "ConstantSchedule", "linear": "LinearSchedule", "float": "FloatSchedule"}
    cls = getattr(sb3_utils, classes[kind], None)
    if cls is not None:
        return cls(*args)
    functions: dict[str, Callable[..., Any]] = {
        "constant": sb3_utils.constant_fn,
        "linear": sb3_utils.get_linear_fn,
        "float": sb3_utils.get_schedule_fn,
    }
    return functions[kind](*args)


def check_object_state(cls: type | None, node: ObjectNode, path: str) -> None:
    """Refuse state keys that are not plain instance attributes of ``cls`` (None: judge the names alone).

    An instance attribute must not shadow a method, property or table of the class. Load's phase 2
    calls this with the classes it knows without importing; decoding, with every class.
    """
    bad = [k for k in node.state if not k.isidentifier() or k.startswith("__") or (cls is not None and _class_level(cls, k))]
    if bad:
        raise FormatError(f"{path}: attribute names {bad[:5]} are not allowed for a {node.cls}")


def _class_level(cls: type, name: str) -> bool:
    """True if ``name`` is a class attribute of ``cls`` other than a scalar default (a method, property, ...)."""
    static = inspect.getattr_static(cls, name, None)
    return static is not None and not isinstance(static, (bool, int, float, str))


class PlaceholderCodec(Codec):
    """Decoding side of placeholders; the walker creates them (they have no Python type to match)."""

    kind = "placeholder"

    def handles(self, value: Any) -> bool:
        return False

    def decode(self, node: PlaceholderNode, path: str, dec: Decoder) -> Any:
        return dec.placeholder(node.key, path)


class PickleCodec(Codec):
    """Decoding side of the opt-in pickle fallback; the walker decides when to pickle."""

    kind = "pickle"

    def handles(self, value: Any) -> bool:
        return False

    def decode(self, node: PickleNode, path: str, dec: Decoder) -> Any:
        return dec.unpickle(node, path)


def _ref(obj: Any) -> str:
    try:
        ref = ref_of(obj)
    except TypeError as e:
        raise NotEncodable(str(e)) from None
    if isinstance(obj, type) and LOCALS in ref and _valid_ref(ref):
        return ref  # a class defined in a function: recorded by name, given back at load with trusted=[cls]
    if not resolves_to(ref, obj):
        raise NotEncodable(f"{ref} cannot be imported back by that name (a lambda, a local or a renamed object)")
    return ref


def _valid_ref(ref: str) -> bool:
    try:
        check_ref(ref)
    except ValueError:
        return False
    return True


#: The codec table, in dispatch order (more specific types first).
CODECS: tuple[Codec, ...] = (
    FloatCodec(),
    EnumCodec(),
    NamedTupleCodec(),
    ListCodec(),
    TupleCodec(),
    DictCodec(),
    DequeCodec(),
    ArrayCodec(),
    NumpyScalarCodec(),
    NumpyDtypeCodec(),
    TensorCodec(),
    TorchDeviceCodec(),
    TorchDtypeCodec(),
    SpaceCodec(),
    ScheduleCodec(),
    RefCodec(),
    ObjectCodec(),
    PlaceholderCodec(),
    PickleCodec(),
)
BY_KIND: dict[str, Codec] = {c.kind: c for c in CODECS}
_BY_TYPE: dict[type, Codec | None] = {}


def codec_for(value: Any) -> Codec | None:
    """The first codec that handles ``value`` (cached by exact type where that decides it)."""
    cls = type(value)
    if cls in _BY_TYPE:
        return _BY_TYPE[cls]
    found = next((c for c in CODECS if c.handles(value)), None)
    if cls not in (float, np.ndarray) and not isinstance(value, np.generic):  # value-dependent decisions
        _BY_TYPE[cls] = found
    return found
