"""Reading stock SB3 files (zips, VecNormalize and replay-buffer pickles) without running their pickles.

A stock SB3 zip stores its non-JSON values with cloudpickle (``data``: ``":serialized:"`` fields) and
its tensors with ``torch.save`` (``*.pth``: a zip holding ``data.pkl`` and one member per storage).
``VecNormalize.save`` and ``save_replay_buffer`` write plain pickles. Unpickling any of these runs
whatever the file names. This reader unpickles them under three rules:

1. **Nothing real is handed to the unpickler.** ``find_class`` answers with one of the fixed
   reconstruction helpers below (``HELPERS``: numpy arrays, dtypes and scalars, numpy generators,
   ``OrderedDict``, ``deque``, ``set``, torch tensors and storages, ``torch.device``), each our own
   function that checks its arguments and builds plain data, or with an inert stand-in for any other
   reference (a ``_Stub`` subclass that records how the pickle uses it: as a value, constructed
   without arguments and given a ``__dict__``, called with one scalar, given tuple fields). The
   unpickler therefore never imports a module the file names, never calls anything the file names,
   and never builds a function or code object: cloudpickle's ``_make_function``, ``types.CodeType``,
   ``builtins.eval`` are stand-ins like any other, refused afterwards.
2. **Each stand-in is then decided by the trust rules** (``TrustList``, the one decision also used by
   ``load``), by exact reference, in the slot where it sits (``policy_kwargs.activation_fn`` must be a
   ``torch.nn.Module`` class, ...), for the use the pickle made of it: a class value (``ref``), a plain
   object rebuilt from its ``__dict__`` without calling its constructor (``object``), an enum member
   (``enum``), a named tuple (``namedtuple``). gymnasium (and gym) spaces are rebuilt from their
   constructor arguments, as the ``space`` codec does. Anything else is refused with the reference and
   where it was used.
3. **Tensors are read by our own reader of the torch zip format** (``data.pkl`` under the same
   restricted unpickler, storages read from ``data/N``), never by ``torch.load``; zip members are
   bounded in count, size and compression ratio, their names are checked and never used as paths, and
   duplicate names are refused.

SB3's schedules before 2.7 (and rl-zoo3's ``linear_schedule``, and any user lambda) are cloudpickled
functions: they are never built. ``lr_schedule`` and ``exploration_schedule`` are left to SB3, which
rebuilds them from ``learning_rate`` and the exploration settings; any other schedule
(``learning_rate``, ``clip_range``, ...) becomes an ``UnreadableSchedule``: the model predicts, and
training raises a clear error until the value is supplied (``custom_objects={"clip_range": 0.2}``).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any, ClassVar, cast

import numpy as np
import torch as th

from sb3_safe_save._errors import FormatError, SafeSaveError, StockPickleRefusedError, UnresolvedResourceError
from sb3_safe_save._trust import RefKind, TrustList, TrustSpec

#: A path, or a binary file object
Source = str | os.PathLike[str] | IO[bytes] | io.BufferedIOBase

# ------------------------------------------------------------------------------------------- bounds
#: Members of a stock zip / of one ``.pth`` (torch zip): more is not a file SB3 or torch wrote.
MAX_MEMBERS = 64
MAX_TORCH_MEMBERS = 100_000
#: Largest uncompressed member, and largest ratio of uncompressed to compressed size (SB3 and torch store
#: members uncompressed; a re-zipped file compresses JSON and floats far less than 200:1).
MAX_MEMBER_BYTES = 16 << 30
MAX_RATIO = 200
#: Nesting of values a materialised pickle may have (SB3 data is a few levels deep).
MAX_DEPTH = 100
_OUTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")
_TORCH_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}(/[A-Za-z0-9_.\-]{1,200}){0,3}")
#: Data keys whose pickled schedule SB3 rebuilds itself in ``_setup_model`` (from ``learning_rate``, the exploration settings)
REBUILT_BY_SB3 = frozenset({"lr_schedule", "exploration_schedule"})
#: Data keys that hold schedules: when their pickle is a function, an ``UnreadableSchedule`` stands in
SCHEDULE_KEYS = frozenset({"learning_rate", "clip_range", "clip_range_vf", "delta_std", "delta_std_schedule"})


# ------------------------------------------------------------------------------------------- stand-ins
class _Stub:
    """Something the unpickler built instead of what the file names; decided after unpickling."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise FormatError(f"the pickle gives a state to a {type(self).__name__}, which takes none")

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


class _Instance(_Stub):
    """An instance of a class the file names (``ref``): how it was made (``args``, ``called``) and its state."""

    __slots__ = ("args", "called", "state")
    ref: ClassVar[str] = ""
    args: tuple[Any, ...]
    called: bool
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> _Instance:
        if kwargs:
            raise FormatError(f"the pickle builds {cls.ref} with keyword arguments")
        obj = object.__new__(cls)
        obj.args, obj.called, obj.state = args, False, None
        return obj

    def __init__(self, *args: Any) -> None:  # only a call (REDUCE) runs __init__; NEWOBJ runs __new__ alone
        self.called = True

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise FormatError(f"the pickle sets the state of a {self.ref} twice")
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Called:
        return _Called(self.ref)


class _Called(_Stub):
    """What calling a stand-in's instance gives (cloudpickle's ``_builtin_type(...)(...)``): refused with its origin."""

    __slots__ = ("ref",)

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Called:
        return self


def _class_stub(ref: str) -> type[_Instance]:
    return type(f"<{ref}>", (_Instance,), {"ref": ref, "__slots__": ()})


@dataclasses.dataclass(eq=False)
class _Value(_Stub):
    """A value built by a helper (array, scalar, dtype, tensor, device, generator): ``value`` is the real one."""

    value: Any

    __setstate__ = _Stub.__setstate__


class _Dtype(_Stub):
    """``numpy.dtype(...)``: the byte order comes from the state that follows."""

    __slots__ = ("char", "order")

    def __init__(self, char: str) -> None:
        self.char, self.order = char, "="

    def __setstate__(self, state: Any) -> None:
        # (3, '<', None, None, None, -1, -1, 0): version, byte order, no subarray, no fields, no names
        if not (isinstance(state, tuple) and len(state) >= 5 and state[2] is None and state[3] is None and state[4] is None):
            raise FormatError("the pickle gives a numpy dtype with a subarray, fields or names; only plain numbers are read")
        if state[1] not in ("<", ">", "|", "="):
            raise FormatError(f"the pickle gives a numpy dtype with byte order {state[1]!r:.20}")
        self.order = state[1]

    def dtype(self) -> np.dtype[Any]:
        return _np_dtype(self.order + self.char if self.char[0] not in "<>|=" else self.char)


class _Array(_Stub):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``; the array comes with the state."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None or not (isinstance(state, tuple) and len(state) == 5):
            raise FormatError("the pickle gives a numpy array a malformed state")
        _, shape, dtype, fortran, raw = state
        self.array = _array_from(raw, dtype, shape, "F" if fortran is True else "C")


class _BitGenerator(_Stub):
    """A numpy bit generator by name; its state comes with the pickle's state (numpy 1 and 2 layouts)."""

    __slots__ = ("name", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: dict[str, Any] | None = None

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # numpy 2: (state, seed sequence); the seed sequence is not kept
            state = state[0]
        if self.state is not None or not isinstance(state, dict):
            raise FormatError("the pickle gives a numpy bit generator a malformed state")
        self.state = state


class _Generator(_Stub):
    """``numpy.random.Generator`` around a ``_BitGenerator`` (numpy 1 gives the state to the generator)."""

    __slots__ = ("bit_generator",)

    def __init__(self, bit_generator: _BitGenerator) -> None:
        self.bit_generator = bit_generator

    def __setstate__(self, state: Any) -> None:
        self.bit_generator.__setstate__(state)


class _Dropped(_Stub):
    """A value the reader does not keep (a seed sequence, an old RandomState): becomes None."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass


class _ODict(collections.OrderedDict):  # type: ignore[type-arg]
    """``collections.OrderedDict`` as torch pickles it: items, and ``_metadata`` as its only attribute."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise FormatError("the pickle gives an OrderedDict attributes other than _metadata")
        self.__dict__.update(state)

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


# ----------------------------------------------------------------------------------------- helpers
_NP_TYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
_NP_NAMES = {
    "bool": "b1", "int8": "i1", "int16": "i2", "int32": "i4", "int64": "i8", "uint8": "u1", "uint16": "u2",
    "uint32": "u4", "uint64": "u8", "float16": "f2", "float32": "f4", "float64": "f8", "bool_": "b1",
}  # fmt: skip
_TORCH_STORAGES = {
    "FloatStorage": th.float32, "DoubleStorage": th.float64, "HalfStorage": th.float16, "BFloat16Storage": th.bfloat16,
    "LongStorage": th.int64, "IntStorage": th.int32, "ShortStorage": th.int16, "CharStorage": th.int8,
    "ByteStorage": th.uint8, "BoolStorage": th.bool,
}  # fmt: skip
_TORCH_DTYPES = {
    "float32": th.float32, "float64": th.float64, "float16": th.float16, "bfloat16": th.bfloat16, "int64": th.int64,
    "int32": th.int32, "int16": th.int16, "int8": th.int8, "uint8": th.uint8, "bool": th.bool,
}  # fmt: skip
_BIT_GENERATORS = {
    "numpy.random._pcg64:PCG64": "PCG64", "numpy.random._pcg64:PCG64DXSM": "PCG64DXSM",
    "numpy.random._mt19937:MT19937": "MT19937", "numpy.random._philox:Philox": "Philox",
    "numpy.random._sfc64:SFC64": "SFC64",
}  # fmt: skip
_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu"})


def _np_dtype(text: Any) -> np.dtype[Any]:
    if not isinstance(text, str):
        raise FormatError(f"the pickle names a numpy dtype by a {type(text).__name__}")
    order, code = (text[0], text[1:]) if text[:1] in ("<", ">", "|", "=") else ("=", text)
    code = _NP_NAMES.get(code, code)
    if code not in _NP_TYPES:
        raise FormatError(f"the pickle uses numpy dtype {text!r:.40}; only booleans, integers and floats are read")
    return np.dtype(("|" if code in ("b1", "i1", "u1") else order) + code)


def _dtype_of(value: Any) -> np.dtype[Any]:
    if isinstance(value, _Dtype):
        return value.dtype()
    if isinstance(value, str):
        return _np_dtype(value)
    raise FormatError(f"the pickle gives a {type(value).__name__} where a numpy dtype belongs")


def _shape_of(shape: Any) -> tuple[int, ...]:
    if not (isinstance(shape, tuple) and len(shape) <= 64 and all(type(d) is int and 0 <= d < 2**48 for d in shape)):
        raise FormatError(f"the pickle gives an array shape {shape!r:.100}")
    return shape


def _array_from(raw: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    dt, dims = _dtype_of(dtype), _shape_of(shape)
    if isinstance(raw, _Value) and isinstance(raw.value, (bytes, bytearray)):  # out-of-band buffers are not read
        raw = raw.value
    if not isinstance(raw, (bytes, bytearray, memoryview)) or order not in ("C", "F"):
        raise FormatError("the pickle gives a numpy array without its bytes (an object array?)")
    if math.prod(dims) * dt.itemsize != memoryview(raw).nbytes:
        raise FormatError(f"the pickle gives {memoryview(raw).nbytes} bytes for a {dt} array of shape {dims}")
    array = np.frombuffer(bytearray(raw), dtype=dt).reshape(dims, order=order)
    return array.astype(dt.newbyteorder("="), copy=False) if dt.byteorder not in "=|" else array


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise FormatError("the pickle reconstructs something other than a numpy.ndarray")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Value:
    return _Value(_array_from(buffer, dtype, shape, order))


def _scalar(dtype: Any, raw: Any = None) -> _Value:
    dt = _dtype_of(dtype)
    if not isinstance(raw, bytes) or len(raw) != dt.itemsize:
        raise FormatError(f"the pickle gives a numpy {dt} scalar {len(raw) if isinstance(raw, bytes) else 'no'} bytes")
    return _Value(np.frombuffer(raw, dtype=dt)[0].astype(dt.newbyteorder("=")))


def _dtype(char: Any, align: Any = False, copy: Any = False) -> _Dtype:
    _np_dtype(char)  # checked now (and again with the byte order)
    return _Dtype(char)


def _odict(*args: Any) -> _ODict:
    if args and not (len(args) == 1 and isinstance(args[0], (list, tuple)) and not args[0]):
        raise FormatError("the pickle builds an OrderedDict from arguments")
    return _ODict()


def _deque(items: Any = (), maxlen: Any = None) -> collections.deque[Any]:
    if not isinstance(items, (list, tuple)) or not (maxlen is None or (type(maxlen) is int and maxlen >= 0)):
        raise FormatError("the pickle builds a deque from something other than a list and a length")
    return collections.deque(items, maxlen)


def _set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple)):
        raise FormatError("the pickle builds a set from something other than a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


def _device(kind: Any, index: Any = None) -> _Value:
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise FormatError("the pickle gives a malformed torch.device")
    device = th.device(kind) if index is None else th.device(kind, index)
    if device.type not in _DEVICE_TYPES:
        raise FormatError(f"the pickle names device {kind!r:.20}")
    return _Value(device)


def _bit_generator(name: Any = "MT19937", *rest: Any) -> _BitGenerator:
    if isinstance(name, _BitGeneratorClass):
        name = name.name
    if name not in _BIT_GENERATORS.values():
        raise FormatError(f"the pickle names bit generator {name!r:.40}")
    return _BitGenerator(name)


def _generator(bit_generator: Any = "MT19937", *rest: Any) -> _Generator:
    if not isinstance(bit_generator, _BitGenerator):
        bit_generator = _bit_generator(bit_generator)
    return _Generator(bit_generator)


def _dropped(*args: Any) -> _Dropped:
    return _Dropped()


class _BitGeneratorClass(_Stub):
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _NdarrayClass(_Stub):
    __slots__ = ()


class _Storage(_Stub):
    """One storage of a torch zip: a flat tensor of its dtype."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: th.Tensor) -> None:
        self.tensor = tensor


class _StorageType(_Stub):
    __slots__ = ("dtype",)

    def __init__(self, dtype: th.dtype) -> None:
        self.dtype = dtype


_NDARRAY = _NdarrayClass()


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, *meta: Any
) -> _Value:
    if not isinstance(storage, _Storage):
        raise FormatError("the pickle rebuilds a tensor from something other than a storage of the file")
    dims, steps = _shape_of(size), _shape_of(stride)
    if type(offset) is not int or offset < 0 or len(dims) != len(steps) or not isinstance(requires_grad, bool):
        raise FormatError("the pickle rebuilds a tensor with a malformed offset, size or stride")
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
        raise FormatError("the pickle rebuilds a tensor with backward hooks")
    end = offset + sum((d - 1) * s for d, s in zip(dims, steps, strict=True)) + 1 if all(dims) else offset
    if math.prod(dims) > max(storage.tensor.numel(), 1):  # an expanded view (stride 0) would be huge to use
        raise FormatError(f"the pickle views {math.prod(dims)} values of a storage of {storage.tensor.numel()}")
    if end > storage.tensor.numel():
        raise FormatError(f"the pickle reads a tensor past the end of its storage ({end} > {storage.tensor.numel()})")
    tensor = storage.tensor.as_strided(dims, steps, offset)
    if requires_grad:
        if not tensor.is_floating_point():
            raise FormatError("the pickle asks gradients for an integer tensor")
        tensor.requires_grad_(True)
    return _Value(tensor)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any = None, *rest: Any) -> _Value:
    if not isinstance(data, _Value) or not isinstance(data.value, th.Tensor) or not isinstance(requires_grad, bool):
        raise FormatError("the pickle rebuilds a parameter from something other than a tensor")
    return _Value(th.nn.Parameter(data.value.detach(), requires_grad=requires_grad))


#: The fixed list of what a pickle may name beyond stand-ins: ``"module:name"`` -> what ``find_class`` returns.
#: Helpers only build plain data from checked arguments; numpy's module moved (``numpy.core`` -> ``numpy._core``).
HELPERS: dict[str, Any] = {
    **{f"{m}.multiarray:_reconstruct": _reconstruct for m in ("numpy.core", "numpy._core")},
    **{f"{m}.multiarray:scalar": _scalar for m in ("numpy.core", "numpy._core")},
    **{f"{m}.numeric:_frombuffer": _frombuffer for m in ("numpy.core", "numpy._core")},
    "numpy:ndarray": _NDARRAY,
    "numpy:dtype": _dtype,
    "numpy.random._pickle:__generator_ctor": _generator,
    "numpy.random._pickle:__bit_generator_ctor": _bit_generator,
    "numpy.random._pickle:__randomstate_ctor": _dropped,  # gym < 0.26 spaces: the legacy RandomState is not kept
    "numpy.random.bit_generator:__pyx_unpickle_SeedSequence": _dropped,
    "numpy.random.bit_generator:SeedSequence": _Dropped(),
    **{ref: _BitGeneratorClass(name) for ref, name in _BIT_GENERATORS.items()},
    "collections:OrderedDict": _odict,
    "collections:deque": _deque,
    "builtins:set": _set,
    "builtins:frozenset": _frozenset,
    "torch:device": _device,
    "torch._utils:_rebuild_tensor_v2": _rebuild_tensor,  # a cloudpickled tensor (ARS weights): its storage is nested
    "torch._utils:_rebuild_parameter": _rebuild_parameter,
}
#: What the pickle of a ``.pth`` member may name (``torch.save`` of state dicts): tensors and nothing else.
TORCH_HELPERS: dict[str, Any] = {
    "collections:OrderedDict": _odict,
    "torch._utils:_rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils:_rebuild_parameter": _rebuild_parameter,
    **{f"torch:{name}": _StorageType(dtype) for name, dtype in _TORCH_STORAGES.items()},
}
_STORAGE_LOADER = "torch.storage:_load_from_bytes"  # cloudpickled tensors: a nested torch zip, read the same way


# --------------------------------------------------------------------------------------- unpickler
class _Unpickler(pickle.Unpickler):
    """``find_class`` answers with helpers and stand-ins only; see the module docstring."""

    def __init__(self, file: IO[bytes], helpers: Mapping[str, Any], *, stubs: bool, storages: Callable[..., Any] | None):
        super().__init__(file)
        self._helpers = helpers
        self._stubs = stubs
        self._storages = storages
        self._classes: dict[str, type[_Instance]] = {}

    def find_class(self, module: str, name: str) -> Any:
        ref = f"{module}:{name}"
        if ref in self._helpers:
            return self._helpers[ref]
        if ref == _STORAGE_LOADER and self._stubs:
            return _nested_storage
        if ref.startswith("torch:") and name in _TORCH_DTYPES and self._stubs:
            return _Value(_TORCH_DTYPES[name])
        if not self._stubs:
            raise StockPickleRefusedError({ref: ["(tensor file)"]}, "a tensor file may name tensors and storages only")
        if ref not in self._classes:
            self._classes[ref] = _class_stub(ref)
        return self._classes[ref]

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise FormatError("the pickle refers to a storage outside a torch file")
        return self._storages(pid)


def _nested_storage(data: Any) -> _Storage:
    if not isinstance(data, bytes):
        raise FormatError("torch.storage._load_from_bytes is given something other than bytes")
    value = read_torch(data, nested=True)
    if not isinstance(value, _Storage):
        raise FormatError("a nested torch payload holds something other than one storage")
    return value


def unpickle(data: bytes | IO[bytes], helpers: Mapping[str, Any] = HELPERS, *, stubs: bool = True) -> Any:
    """Unpickle ``data`` with the restricted unpickler: helpers and stand-ins only (see the module docstring)."""
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _Unpickler(f, helpers, stubs=stubs, storages=None).load()
    except SafeSaveError:
        raise
    except RecursionError:
        raise FormatError("the pickle nests too deeply") from None
    except Exception as e:  # a malformed stream, or a helper refusing its arguments through Python's own checks
        raise FormatError(f"the pickle cannot be read: {type(e).__name__}: {str(e)[:200]}") from None


# --------------------------------------------------------------------------------------- torch zips
def _check_members(zf: zipfile.ZipFile, what: str, limit: int, pattern: re.Pattern[str]) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limit:
        raise FormatError(f"{what} has {len(infos)} members (at most {limit} are read)")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if name in out:
            raise FormatError(f"{what} holds the member {name!r:.100} twice")
        if not pattern.fullmatch(name) or ".." in name.split("/"):
            raise FormatError(f"{what} holds a member named {name!r:.100}, which no SB3 or torch file has")
        if info.file_size > MAX_MEMBER_BYTES:
            raise FormatError(f"{what}: member {name!r} is {info.file_size} bytes uncompressed (at most {MAX_MEMBER_BYTES})")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_RATIO * max(info.compress_size, 1024):
            raise FormatError(f"{what}: member {name!r} expands {info.file_size}:{info.compress_size} (a zip bomb?)")
        out[name] = info
    return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> bytes:
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise FormatError(f"{what}: member {info.filename!r} cannot be read: {e}") from None
    if len(data) != info.file_size:
        raise FormatError(f"{what}: member {info.filename!r} is not the size its entry says")
    return data


def read_torch(data: bytes, *, name: str = "tensor file", nested: bool = False) -> Any:
    """The object a ``torch.save`` zip holds, read with the restricted unpickler (tensors as ``_Value``).

    :param data: the bytes of the torch zip (a ``.pth`` member of a stock zip)
    :param name: what to call it in errors
    :param nested: a payload of ``torch.storage._load_from_bytes`` (no further nesting is read)
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        if nested:  # a cloudpickled storage: torch writes it in its legacy (pre-1.6) format
            return _read_legacy_storage(data, name)
        raise FormatError(f"{name} is not a torch zip file (the legacy torch format before 1.6 is not read)") from None
    with zf:
        members = _check_members(zf, name, MAX_TORCH_MEMBERS, _TORCH_NAME)
        pickles = [n for n in members if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise FormatError(f"{name} has {len(pickles)} data.pkl members, expected one")
        prefix = pickles[0][: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        if order is not None and _read_member(zf, order, name) != b"little":
            raise FormatError(f"{name} was written on a big-endian machine; it is not read")
        storages: dict[str, _Storage] = {}

        def storage(pid: Any) -> _Storage:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise FormatError(f"{name}: a malformed storage reference")
            _, kind, key, _location, numel = pid
            if not isinstance(kind, _StorageType) or not isinstance(key, str) or not key.isdigit() or type(numel) is not int:
                raise FormatError(f"{name}: a malformed storage reference")
            if key not in storages:
                info = members.get(f"{prefix}data/{key}")
                if info is None:
                    raise FormatError(f"{name}: storage {key} is missing")
                raw = bytearray(_read_member(zf, info, name))
                itemsize = th.empty((), dtype=kind.dtype).element_size()
                if len(raw) != numel * itemsize:
                    raise FormatError(f"{name}: storage {key} has {len(raw)} bytes for {numel} {kind.dtype} values")
                flat = th.frombuffer(raw, dtype=kind.dtype) if raw else th.empty(0, dtype=kind.dtype)
                storages[key] = _Storage(flat)
            found = storages[key]
            if found.tensor.dtype != kind.dtype:
                raise FormatError(f"{name}: storage {key} is read as two dtypes")
            return found

        raw_pickle = _read_member(zf, members[pickles[0]], name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # frombuffer on a bytearray
                return _Unpickler(io.BytesIO(raw_pickle), TORCH_HELPERS, stubs=False, storages=storage).load()
        except SafeSaveError:
            raise
        except Exception as e:
            raise FormatError(f"{name}: the pickle cannot be read: {type(e).__name__}: {str(e)[:200]}") from None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy_storage(data: bytes, name: str) -> _Storage:
    """One storage in torch's legacy format (``torch.storage._load_from_bytes``): header pickles, the storage's
    reference, its key, then its element count and bytes. Every pickle goes through the restricted unpickler."""
    f = io.BytesIO(data)
    refs: list[tuple[str, th.dtype, int]] = []

    def reference(pid: Any) -> str:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and pid[5] is None):
            raise FormatError(f"{name}: a malformed storage reference")
        _, kind, key, _location, numel, _ = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or refs:
            raise FormatError(f"{name}: a malformed storage reference")
        refs.append((key, kind.dtype, numel))
        return key

    def load(storages: Callable[..., Any] | None = None) -> Any:
        try:
            return _Unpickler(f, TORCH_HELPERS, stubs=False, storages=storages).load()
        except SafeSaveError:
            raise
        except Exception as e:
            raise FormatError(f"{name}: the pickle cannot be read: {type(e).__name__}: {str(e)[:200]}") from None

    magic, protocol, info = load(), load(), load()
    if magic != _LEGACY_MAGIC or protocol != 1001 or not (isinstance(info, dict) and info.get("little_endian") is True):
        raise FormatError(f"{name}: not a little-endian torch payload")
    key = load(reference)
    if not refs or key != refs[0][0] or load() != [key]:
        raise FormatError(f"{name}: a nested torch payload must hold exactly one storage")
    _, dtype, numel = refs[0]
    itemsize = th.empty((), dtype=dtype).element_size()
    count = int.from_bytes(f.read(8), "little")
    raw = bytearray(f.read())
    if count != numel or len(raw) != numel * itemsize:
        raise FormatError(f"{name}: the storage holds {len(raw)} bytes for {numel} {dtype} values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _Storage(th.frombuffer(raw, dtype=dtype) if raw else th.empty(0, dtype=dtype))


# --------------------------------------------------------------------------------- materialisation
class _Materialiser:
    """Turn what the unpickler built into real values, each stand-in decided by the trust rules at its path."""

    def __init__(self, trust: TrustList) -> None:
        self._trust = trust
        self._done: dict[int, tuple[Any, Any]] = {}
        self._busy: set[int] = set()
        self.refused: dict[str, list[str]] = {}
        self.reasons: dict[str, str] = {}

    def refuse(self, ref: str, path: str, reason: str) -> None:
        self.refused.setdefault(ref, []).append(path)
        self.reasons.setdefault(ref, reason)

    def __call__(self, value: Any, path: str, depth: int = 0) -> Any:
        if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
            return value
        key = id(value)
        if key in self._done:
            return self._done[key][1]
        if key in self._busy:
            raise FormatError(f"{path}: the pickle holds a cycle; stock SB3 data has none")
        if depth > MAX_DEPTH:
            raise FormatError(f"{path}: the pickle nests over {MAX_DEPTH} levels")
        self._busy.add(key)
        try:
            out = self._convert(value, path, depth + 1)
        finally:
            self._busy.discard(key)
        self._done[key] = (value, out)  # the source is kept alive: its id stays unique while this runs
        return out

    def _convert(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, _Value):
            return value.value
        if isinstance(value, (np.ndarray, np.generic, th.Tensor, th.dtype, th.device)):
            return value
        if isinstance(value, _Array):
            if value.array is None:
                raise FormatError(f"{path}: the pickle reconstructs a numpy array without its data")
            return value.array
        if isinstance(value, _Dtype):
            return value.dtype()
        if isinstance(value, _Generator):
            return _generator_from(value.bit_generator, path)
        if isinstance(value, _Dropped):
            return None
        if isinstance(value, type) and issubclass(value, _Instance):
            return self._resolve(value.ref, path, "ref")
        if isinstance(value, _Instance):
            return self._instance(value, path, depth)
        if isinstance(value, _Called):
            self.refuse(value.ref, path, "the pickle calls what it built from it")
            return None
        return self._container(value, path, depth)

    def _container(self, value: Any, path: str, depth: int) -> Any:
        from sb3_safe_save._manifest import child_path

        if isinstance(value, dict):
            out: dict[Any, Any] = collections.OrderedDict() if isinstance(value, collections.OrderedDict) else {}
            for k, v in value.items():
                k2 = self(k, f"{path}.<key>", depth)
                out[k2] = self(v, child_path(path, k2), depth)
            metadata = vars(value).get("_metadata") if isinstance(value, _ODict) else None
            if metadata is not None:  # a state dict's module versions (torch's load_state_dict reads them)
                out._metadata = self(metadata, f"{path}._metadata", depth)  # type: ignore[attr-defined]
            return out
        if isinstance(value, list):
            return [self(v, child_path(path, i), depth) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(self(v, child_path(path, i), depth) for i, v in enumerate(value))
        if isinstance(value, collections.deque):
            return collections.deque((self(v, child_path(path, i), depth) for i, v in enumerate(value)), value.maxlen)
        if isinstance(value, (set, frozenset)):
            return type(value)(self(v, path, depth) for v in value)
        raise FormatError(f"{path}: the pickle builds a {type(value).__name__} here, which is not data")

    def _resolve(self, ref: str, path: str, kind: RefKind, why_not: str = "not trusted") -> Any:
        if self._trust.why(ref, kind) is None:
            self.refuse(ref, path, why_not)
            return None
        try:
            return self._trust.resolve(ref, path, kind)
        except FormatError as e:
            self.refuse(ref, path, str(e))
            return None

    def _instance(self, obj: _Instance, path: str, depth: int) -> Any:
        from sb3_safe_save._manifest import child_path

        ref = obj.ref
        space = _space_ref(ref)
        if space is not None and not obj.called and not obj.args:
            return self._space(space, obj.state, path, depth)
        if obj.called and len(obj.args) == 1 and obj.state is None:  # Enum: cls(value)
            cls = self._resolve(ref, path, "enum", "the pickle calls it")
            value = self(obj.args[0], path, depth)
            if cls is None:
                return None
            if not isinstance(value, (type(None), bool, int, float, str)):
                raise FormatError(f"{path}: the enum {ref} is given a {type(value).__name__}")
            try:
                return cls(value)
            except ValueError as e:
                raise FormatError(f"{path}: {e}") from None
        if obj.called:
            self.refuse(ref, path, "the pickle calls it")
            return None
        if obj.args:  # NEWOBJ with fields: a named tuple
            cls = self._resolve(ref, path, "namedtuple")
            if cls is None:
                return None
            fields = cls._fields
            if len(obj.args) != len(fields) or obj.state is not None:
                raise FormatError(f"{path}: {ref} takes fields {list(fields)}, the pickle gives {len(obj.args)} values")
            return cls(*(self(a, child_path(path, f), depth) for a, f in zip(obj.args, fields, strict=True)))
        return self._object(ref, obj.state, path, depth)

    def _object(self, ref: str, state: Any, path: str, depth: int) -> Any:
        from sb3_safe_save._codecs import BY_KIND, _class_level, schedule_class_missing
        from sb3_safe_save._manifest import ScheduleNode, child_path

        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise FormatError(f"{path}: an object of {ref} without a plain __dict__ state")
        kind = schedule_class_missing(ref)
        if kind is not None:  # an SB3 >= 2.7 schedule read by an older SB3: its closure from the same fields
            values = {k: self(v, child_path(path, k), depth) for k, v in state.items()}
            return BY_KIND["schedule"].decode(ScheduleNode(schedule=kind, args=values), path, _Direct())  # type: ignore[arg-type]
        cls = self._resolve(ref, path, "object")
        if cls is None:
            return None
        bad = [k for k in state if not k.isidentifier() or k.startswith("__") or _class_level(cls, k)]
        if bad:
            raise FormatError(f"{path}: attribute names {bad[:5]} are not allowed for a {ref}")
        values = {k: self(v, child_path(path, k), depth) for k, v in state.items()}
        out: Any = object.__new__(cls)
        object.__getattribute__(out, "__dict__").update(values)
        return out

    def _space(self, ref: str, state: Any, path: str, depth: int) -> Any:
        from sb3_safe_save._codecs import MAX_SPACE_ELEMENTS, SpaceCodec
        from sb3_safe_save._manifest import child_path

        cls = self._resolve(ref, path, "ref")
        if cls is None:
            return None
        names = SpaceCodec._ARGS.get(cls)
        if names is None or not isinstance(state, dict):
            raise FormatError(f"{path}: {ref} is not a space the reader rebuilds (Box, Discrete, MultiDiscrete, ...)")
        values = {k: self(v, child_path(path, k), depth) for k, v in state.items() if isinstance(k, str)}
        args = {n: values[n] for n in names if n in values}
        if "shape" in names and "shape" not in args and "_shape" in values:
            args["shape"] = values["_shape"]
        shape = args.get("shape")
        if shape is not None and (
            not isinstance(shape, tuple) or not all(type(d) is int for d in shape) or math.prod(shape) > MAX_SPACE_ELEMENTS
        ):
            raise FormatError(f"{path}: a space of shape {shape!r:.100}")
        if names[0] == "low" and not all(isinstance(args.get(k), np.ndarray) for k in ("low", "high")):
            raise FormatError(f"{path}: a Box space without low and high arrays")  # a scalar would be filled to shape
        if "spaces" in args and isinstance(args["spaces"], Mapping):
            args["spaces"] = dict(args["spaces"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                space = cls(**args)
        except (TypeError, ValueError, AssertionError, AttributeError) as e:
            raise FormatError(f"{path}: cannot rebuild the {ref} space: {e}") from None
        rng = values.get("_np_random")
        if isinstance(rng, np.random.Generator):
            space._np_random = rng
        return space


class _Direct:
    """The codecs' ``Decoder`` for plain Python values (an SB3 >= 2.7 schedule's fields, already materialised)."""

    def decode(self, node: Any, path: str) -> Any:
        return node


def _space_ref(ref: str) -> str | None:
    """The gymnasium space class a (gym or gymnasium) space reference stands for, else None."""
    module, _, name = ref.partition(":")
    for old in ("gym.spaces.", "gymnasium.spaces."):
        if module.startswith(old) and module.count(".") == 2:
            return f"gymnasium.spaces.{module[len(old) :]}:{name}"
    return None


def _generator_from(bit: _BitGenerator, path: str) -> np.random.Generator | None:
    if bit.state is None:
        return None
    m = _Materialiser(TrustList(None))
    state = m(bit.state, path)
    try:
        bitgen = getattr(np.random, bit.name)()
        bitgen.state = state
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise FormatError(f"{path}: invalid random generator state: {e}") from None
    return np.random.Generator(bitgen)


# ----------------------------------------------------------------------------------------- schedules
class UnreadableSchedule:
    """Stands in for a schedule the stock file stores as a pickled function (never run).

    The model predicts as usual; training calls the schedule and gets a clear error instead.

    :param name: the attribute it stands for (``learning_rate``, ``clip_range``, ...)
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, progress_remaining: float) -> float:
        raise UnresolvedResourceError(
            f"{self.name} was a pickled function in the stock SB3 file; it was not run, so it is unknown."
            f" Supply it when loading: custom_objects={{{self.name!r}: <a float or a schedule>}}"
        )

    def __repr__(self) -> str:
        return f"UnreadableSchedule({self.name!r})"


# --------------------------------------------------------------------------------------- stock zips
@dataclasses.dataclass
class StockFile:
    """What a stock SB3 zip holds, read without running anything: as ``load_from_zip_file`` returns it.

    ``unreadable`` lists the schedule keys whose pickled functions were not built (see the module docstring).
    """

    data: dict[str, Any]
    params: dict[str, Any]
    pytorch_variables: dict[str, Any]
    version: str | None
    unreadable: list[str]


def _open_zip(path: Source) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(cast(Any, path))
    except zipfile.BadZipFile:
        raise FormatError(f"{path} is not a zip file (stock SB3 saves are zips)") from None


def _data_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"the zip's data member is not JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise FormatError("the zip's data member is not a JSON object")
    return data


def serialized(value: Any) -> bytes | None:
    """The pickle bytes of a ``data`` entry SB3 serialised with cloudpickle, else None."""
    if not (isinstance(value, dict) and ":serialized:" in value):
        return None
    text = value[":serialized:"]
    try:
        return base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except (binascii.Error, ValueError):
        raise FormatError("a :serialized: entry of the data member is not base64") from None


def read_stock(
    path: Source,
    *,
    trusted: TrustSpec | None = None,
    home: type | None = None,
    custom_objects: Mapping[str, Any] | None = None,
) -> StockFile:
    """Read a stock SB3 zip without running its pickles (see the module docstring).

    :param path: the zip
    :param trusted: classes or ``"module:QualName"`` strings trusted beyond the defaults (as ``load(trusted=)``)
    :param home: the class the model will be loaded with (classes of its module are trusted)
    :param custom_objects: data keys to take from here instead of the file (their pickles are not read)
    :raises StockPickleRefusedError: a pickle names something the trust rules refuse
    :raises FormatError: the zip or a pickle in it is malformed or out of bounds
    """
    custom_objects = dict(custom_objects or {})
    trust = TrustList(trusted, home=home)
    m = _Materialiser(trust)
    with _open_zip(path) as zf:
        members = _check_members(zf, "the zip", MAX_MEMBERS, _OUTER_NAME)
        if "data" not in members:
            raise FormatError("the zip has no data member: it is not a stock SB3 save")
        raw = _data_json(_read_member(zf, members["data"], "the zip"))
        data: dict[str, Any] = {}
        unreadable: list[str] = []
        for key, value in raw.items():
            if key in custom_objects:
                data[key] = custom_objects[key]
                continue
            blob = serialized(value)
            if blob is None:
                data[key] = value
                continue
            before = dict(m.refused)
            try:
                decoded = m(unpickle(blob), key)
            except FormatError:
                foreign = [r for r in scan_pickle(blob, key).globals if r not in HELPERS]
                if not foreign:
                    raise
                for ref in foreign:  # the stream failed on what it built from these: name them
                    m.refuse(ref, key, "the pickle cannot be read without it")
                decoded = None
            if (key in REBUILT_BY_SB3 or key in SCHEDULE_KEYS) and m.refused != before:
                m.refused = before  # a pickled function: never built; SB3 rebuilds it, or it stays unknown
                if key in SCHEDULE_KEYS:
                    unreadable.append(key)
                continue
            data[key] = decoded
        if m.refused:
            raise StockPickleRefusedError(m.refused, reasons=m.reasons)
        params: dict[str, Any] = {}
        variables: dict[str, Any] = {}
        for name, info in members.items():
            if not name.endswith(".pth"):
                continue
            value = _tensors(read_torch(_read_member(zf, info, "the zip"), name=name), name)
            if name in ("pytorch_variables.pth", "tensors.pth"):
                variables = value
            else:
                params[name[: -len(".pth")]] = value
        version = None
        if "_stable_baselines3_version" in members:
            version = _read_member(zf, members["_stable_baselines3_version"], "the zip").decode("utf-8", "replace")[:40]
    return StockFile(data, params, variables, version, unreadable)


def _tensors(value: Any, name: str) -> Any:
    """A ``.pth`` member's object as plain dicts, lists and tensors (no trust decision: it can name nothing else)."""
    return _Materialiser(TrustList(None))(value, name.removesuffix(".pth"))


# --------------------------------------------------------------------------------------------- audit
@dataclasses.dataclass
class PickleScan:
    """What one pickle would import (``globals``) and how often it calls (``calls``), from its opcodes alone."""

    where: str
    globals: list[str]
    calls: int


def scan_pickle(data: bytes, where: str) -> PickleScan:
    """List a pickle's GLOBAL/STACK_GLOBAL/INST references and count its REDUCE/NEWOBJ/OBJ/BUILD calls, without running it."""
    refs: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    calls = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                refs.append(":".join(str(arg).split(" ", 1)))
            elif op.name == "STACK_GLOBAL":
                refs.append(":".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif op.name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "BUILD"):
                calls += 1
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(cast(int, arg))] = strings[-1]
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(cast(int, arg)) in memo:
                strings.append(memo[int(cast(int, arg))])
    except Exception as e:  # a malformed stream: report what was seen
        refs.append(f"<malformed pickle: {type(e).__name__}>")
    return PickleScan(where, sorted(set(refs)), calls)


def scan_stock(path: Source) -> list[PickleScan]:
    """Every pickle of a stock zip (``data`` fields and ``.pth`` members), scanned without running anything."""
    out: list[PickleScan] = []
    with _open_zip(path) as zf:
        members = _check_members(zf, "the zip", MAX_MEMBERS, _OUTER_NAME)
        if "data" in members:
            for key, value in _data_json(_read_member(zf, members["data"], "the zip")).items():
                blob = serialized(value)
                if blob is not None:
                    out.append(scan_pickle(blob, f"data.{key}"))
        for name, info in members.items():
            if name.endswith(".pth"):
                with (
                    contextlib.suppress(zipfile.BadZipFile),
                    zipfile.ZipFile(io.BytesIO(_read_member(zf, info, name))) as inner,
                ):
                    inner_members = _check_members(inner, name, MAX_TORCH_MEMBERS, _TORCH_NAME)
                    for n, i in inner_members.items():
                        if n.endswith("data.pkl"):
                            out.append(scan_pickle(_read_member(inner, i, name), name))
    return out


@dataclasses.dataclass
class StockAudit:
    """What a stock zip's pickles would import and call (from their opcodes), and whether the safe reader accepts it."""

    source: str
    sb3_version: str | None
    accepted: bool
    refusal: str | None
    pickles: list[PickleScan]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        verdict = "accepted by the safe reader" if self.accepted else f"refused by the safe reader: {self.refusal}"
        lines = [f"Stock SB3 zip {self.source} (saved by SB3 {self.sb3_version or 'unknown'}): {verdict}", "Pickles:"]
        for scan in self.pickles:
            lines.append(f"  {scan.where}: {scan.calls} calls; imports {', '.join(scan.globals) or 'nothing'}")
        return "\n".join(lines)


def audit_stock(path: str | os.PathLike[str], trusted: TrustSpec | None = None) -> StockAudit:
    """Scan every pickle of a stock zip without running it, then try the safe reader (which runs nothing either)."""
    scans = scan_stock(path)
    refusal: str | None = None
    version: str | None = None
    try:
        version = read_stock(path, trusted=trusted).version
    except StockPickleRefusedError as e:
        refusal = e.summary()
    except SafeSaveError as e:
        refusal = str(e).split("\n", 1)[0]
    return StockAudit(os.fspath(path), version, refusal is None, refusal, scans)


# ------------------------------------------------------------------------------------------- models
def build_model(
    cls: type[Any],
    stock: StockFile,
    env: Any = None,
    device: th.device | str = "auto",
    force_reset: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Build a ``cls`` model from a read stock zip, the way SB3's ``BaseAlgorithm.load`` does.

    Differences from SB3: a stored ``env`` (or any attribute SB3's ``save`` never writes) is refused,
    torch variables must be ones ``cls`` has, and schedules the file holds only as pickled functions
    are ``UnreadableSchedule`` placeholders (see the module docstring).

    :raises FormatError: the stored values cannot rebuild a ``cls`` model
    :raises StateMismatchError: ``env`` does not fit, or ``policy_kwargs`` in ``kwargs`` differ from the stored ones
    """
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.utils import check_for_correct_spaces

    from sb3_safe_save._errors import StateMismatchError
    from sb3_safe_save._persist import _equal, check_policy_data, no_weight_init, refused_keys

    kwargs = dict(kwargs or {})
    data = dict(stock.data)
    roots = {n.partition(".")[0] for n in (*stock.params, *stock.pytorch_variables)}
    refused = refused_keys(cls, data, roots)
    if refused:
        detail = "; ".join(f"{name!r}: {why}" for name, why in list(refused.items())[:5])
        raise FormatError(f"the stock zip sets attributes a {cls.__qualname__} file never holds ({detail})")
    _clean_policy_kwargs(data)
    if "policy_kwargs" in kwargs and not _equal(kwargs["policy_kwargs"], data.get("policy_kwargs")):
        raise StateMismatchError("the policy_kwargs passed to load differ from the stored ones")
    check_policy_data(data)
    if env is not None:
        try:
            env = cls._wrap_env(env, data.get("verbose", 0))
            check_for_correct_spaces(env, data["observation_space"], data["action_space"])
        except Exception as e:
            raise StateMismatchError(f"the env given to load does not fit the saved agent: {type(e).__name__}: {e}") from None
        if force_reset:
            data["_last_obs"] = None
        data["n_envs"] = env.num_envs
    markers = {key: UnreadableSchedule(key) for key in stock.unreadable if key not in kwargs}
    for key, marker in markers.items():  # SB3 calls lr_schedule(1) to build the optimizer: a number until then
        data[key] = 0.0 if key == "learning_rate" else marker
    try:
        model = cls(policy=data["policy_class"], env=env, device=device, _init_setup_model=False)
        model.__dict__.update(data)
        model.__dict__.update(kwargs)
        with no_weight_init():
            model._setup_model()
        unknown = sorted(set(stock.params) - set(model._get_torch_save_params()[0]))
        if unknown:  # set_parameters would call load_state_dict on whatever these names reach
            raise FormatError(f"the stock zip holds state dicts {unknown[:5]} that a {cls.__qualname__} does not save")
        _set_parameters(model, dict(stock.params), device)
        _set_variables(model, stock.pytorch_variables)
        if model.use_sde:
            model.policy.reset_noise()
    except SafeSaveError:
        raise
    except Exception as e:
        raise FormatError(f"the stock zip's values cannot rebuild a {cls.__qualname__}: {type(e).__name__}: {e}") from e
    for key, marker in markers.items():
        setattr(model, key, marker)
        if key == "learning_rate":
            model.lr_schedule = marker
    assert isinstance(model, BaseAlgorithm)
    return model


def _clean_policy_kwargs(data: dict[str, Any]) -> None:
    """As SB3's load: a copy of ``policy_kwargs`` without ``device``, SB3 < 1.8's ``net_arch=[dict(...)]`` unwrapped."""
    policy_kwargs = data.get("policy_kwargs")
    if isinstance(policy_kwargs, dict):
        policy_kwargs = data["policy_kwargs"] = dict(policy_kwargs)
        policy_kwargs.pop("device", None)
        net_arch = policy_kwargs.get("net_arch")
        if net_arch and isinstance(net_arch, list) and isinstance(net_arch[0], dict):
            policy_kwargs["net_arch"] = net_arch[0]


def _set_variables(model: Any, variables: Mapping[str, Any]) -> None:
    """Torch variables (``log_ent_coef``) through ``.data``, as SB3 does; only names the model saves itself."""
    allowed = set(model._get_torch_save_params()[1])
    for name, value in variables.items():
        if value is None:
            continue
        if name not in allowed or not isinstance(value, th.Tensor):
            raise FormatError(
                f"pytorch_variables.pth holds {name!r:.100}, which a {type(model).__qualname__} has no tensor for"
            )
        target = model
        for part in name.split(".")[:-1]:
            target = getattr(target, part)
        getattr(target, name.split(".")[-1]).data = value.data.to(model.device)


def _set_parameters(model: Any, params: dict[str, Any], device: Any) -> None:
    """``set_parameters`` with SB3's two fallbacks (A2C/PPO from SB3 < 1.7, DQN optimizers from SB3 < 2.4)."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    try:
        BaseAlgorithm.set_parameters(model, params, exact_match=True, device=device)
    except RuntimeError as e:
        if "pi_features_extractor" in str(e) and "Missing key(s) in state_dict" in str(e):
            BaseAlgorithm.set_parameters(model, params, exact_match=False, device=device)
        else:
            raise
    except ValueError:
        groups = (
            params.get("policy.optimizer", {}).get("param_groups")
            if isinstance(params.get("policy.optimizer"), dict)
            else None
        )
        n_params = len(model.policy.optimizer.param_groups[0]["params"]) if hasattr(model.policy, "optimizer") else -1
        if not (isinstance(groups, list) and groups and len(groups[0].get("params", [])) == 2 * n_params):
            raise
        groups[0]["params"] = groups[0]["params"][:n_params]
        BaseAlgorithm.set_parameters(model, params, exact_match=True, device=device)


#: policy package -> algorithm, where the policy lives outside the algorithm's own package
_SHARED_POLICY_PACKAGES = {"sb3_contrib.common.recurrent": "RecurrentPPO", "sb3_contrib.common.maskable": "MaskablePPO"}


def guess_algorithm(data: Mapping[str, Any]) -> type[Any] | None:
    """The SB3/sb3-contrib algorithm that wrote a stock zip, from its policy class and data keys; None if unclear.

    :param data: the zip's data as ``read_stock`` gives it (a schedule key counts even when unreadable)
    """
    import importlib

    from stable_baselines3.common.base_class import BaseAlgorithm

    policy = data.get("policy_class")
    package = (getattr(policy, "__module__", "") or "").rpartition(".")[0]
    name: str | None = None
    if package == "stable_baselines3.td3":
        name = "DDPG" if data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0.0 else "TD3"
    elif package == "stable_baselines3.common":
        name = "PPO" if "clip_range" in data else ("TRPO" if "cg_max_steps" in data else "A2C")
    elif package in _SHARED_POLICY_PACKAGES:
        name = _SHARED_POLICY_PACKAGES[package]
    elif package.startswith(("stable_baselines3.", "sb3_contrib.")):
        found = [
            v for v in vars(importlib.import_module(package)).values() if isinstance(v, type) and issubclass(v, BaseAlgorithm)
        ]
        return found[0] if len(found) == 1 else None
    for root in ("stable_baselines3", "sb3_contrib"):
        with contextlib.suppress(ImportError):
            cls = getattr(importlib.import_module(root), name or "", None)
            if isinstance(cls, type) and issubclass(cls, BaseAlgorithm):
                return cls
    return None


def load_stock(
    cls: type[Any],
    path: Source,
    env: Any = None,
    device: th.device | str = "auto",
    custom_objects: Mapping[str, Any] | None = None,
    force_reset: bool = True,
    *,
    trusted: TrustSpec | None = None,
    expected_sha256: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a stock SB3 zip as a ``cls`` model without running its pickles (``Algo.load(path, stock=True)``)."""
    if expected_sha256 is not None:
        from sb3_safe_save._file import _open
        from sb3_safe_save._persist import check_sha256

        with _open(cast(Any, path)) as (f, _):
            check_sha256(f, expected_sha256)
    stock = read_stock(path, trusted=trusted, home=cls, custom_objects=custom_objects)
    return build_model(cls, stock, env, device, force_reset, kwargs)


# ------------------------------------------------------------------------------- pickled companions
_VEC_NORMALIZE = "stable_baselines3.common.vec_env.vec_normalize:VecNormalize"
_RUNNING_MEAN_STD = "stable_baselines3.common.running_mean_std:RunningMeanStd"
_BUFFERS = ("stable_baselines3.common.buffers:ReplayBuffer", "stable_baselines3.common.buffers:DictReplayBuffer")
_VN_FIELDS = ("training", "norm_obs", "norm_reward", "clip_obs", "clip_reward", "gamma", "epsilon", "norm_obs_keys")
_BUFFER_FIELDS = ("buffer_size", "n_envs", "pos", "full", "optimize_memory_usage", "handle_timeout_termination")
_BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def _read_pickle_file(path: Source) -> Any:
    if isinstance(path, (str, os.PathLike)):
        if os.path.getsize(path) > MAX_MEMBER_BYTES:
            raise FormatError(f"{path} is over {MAX_MEMBER_BYTES} bytes")
        with open(path, "rb") as f:
            return unpickle(f.read())
    return unpickle(path.read(MAX_MEMBER_BYTES + 1))


def _top(value: Any, refs: tuple[str, ...], what: str) -> tuple[str, dict[str, Any]]:
    """The class reference and ``__dict__`` state of the pickle's top object, which must be one of ``refs``."""
    if not isinstance(value, _Instance) or value.called or value.args or not isinstance(value.state, dict):
        raise FormatError(f"the pickle holds no {what} (its top object is a {type(value).__name__})")
    if value.ref not in refs:  # a fixed list, by exact reference
        raise StockPickleRefusedError({value.ref: ["(the pickle's top object)"]}, f"expected a {what}")
    return value.ref, value.state


def _plain(value: Any, path: str) -> Any:
    """Arrays, numbers, strings and containers of them; any class is refused (nothing is trusted here)."""
    m = _Materialiser(_NO_TRUST)
    out = m(value, path)
    if m.refused:
        raise StockPickleRefusedError(m.refused, reasons=m.reasons)
    return out


class _NoTrust(TrustList):
    def why(self, ref: str, kind: RefKind = "ref") -> Any:
        return None


_NO_TRUST = _NoTrust(None)


def _rms(value: Any, path: str) -> Any:
    from stable_baselines3.common.running_mean_std import RunningMeanStd

    if not (isinstance(value, _Instance) and value.ref == _RUNNING_MEAN_STD and isinstance(value.state, dict)):
        raise FormatError(f"{path}: expected a RunningMeanStd")
    rms: Any = object.__new__(RunningMeanStd)
    for name in ("mean", "var", "count"):
        setattr(rms, name, _plain(value.state.get(name), f"{path}.{name}"))
    return rms


def read_vecnormalize(path: Source) -> tuple[Any, dict[str, np.ndarray]]:
    """The settings and statistics of a ``VecNormalize.save`` pickle, read without running it.

    :return: ``(VecNormalizeState, arrays)`` as ``export_vecnormalize`` gives them for a live ``VecNormalize``
    """
    from pydantic import ValidationError
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_safe_save._vecnormalize import export_vecnormalize

    _, state = _top(_read_pickle_file(path), (_VEC_NORMALIZE,), "VecNormalize")
    venv: Any = object.__new__(VecNormalize)  # only read back by export_vecnormalize below, never used as an env
    obs_rms = state.get("obs_rms")
    if isinstance(obs_rms, dict):
        venv.obs_rms = {str(k): _rms(v, f"obs_rms.{k}") for k, v in obs_rms.items()}
    elif obs_rms is not None:
        venv.obs_rms = _rms(obs_rms, "obs_rms")
    venv.ret_rms = _rms(state.get("ret_rms"), "ret_rms")
    venv.old_reward = _plain(state.get("old_reward", np.array([])), "old_reward")
    venv.old_obs = _plain(state.get("old_obs"), "old_obs")
    for name in _VN_FIELDS:
        setattr(venv, name, _plain(state.get(name), name))
    try:
        return export_vecnormalize(venv)
    except (ValidationError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(f"the VecNormalize pickle holds malformed settings: {str(e)[:300]}") from None


def read_buffer(path: Source) -> bytes:
    """A ``save_replay_buffer`` pickle (``ReplayBuffer``/``DictReplayBuffer``), read without running it, as the
    bytes of our own replay-buffer file (so that loading it goes through the same checks as ours)."""
    from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

    from sb3_safe_save._buffers import save_buffer

    ref, state = _top(_read_pickle_file(path), _BUFFERS, "ReplayBuffer or DictReplayBuffer")
    buffer: Any = object.__new__(DictReplayBuffer if ref == _BUFFERS[1] else ReplayBuffer)
    for name in (*_BUFFER_FIELDS, *_BUFFER_ARRAYS):
        if name in state:
            setattr(buffer, name, _plain(state[name], name))
    if not hasattr(buffer, "timeouts") and isinstance(getattr(buffer, "dones", None), np.ndarray):
        buffer.timeouts = np.zeros_like(buffer.dones)  # SB3 < 2.1 buffers had none (SB3 adds them the same way)
    if not hasattr(buffer, "handle_timeout_termination"):
        buffer.handle_timeout_termination = True
    out = io.BytesIO()
    try:
        save_buffer(buffer, out, fsync=False)
    except SafeSaveError:
        raise
    except Exception as e:  # missing or malformed fields of a hostile pickle
        raise FormatError(f"the replay-buffer pickle is malformed: {type(e).__name__}: {str(e)[:300]}") from None
    return out.getvalue()
