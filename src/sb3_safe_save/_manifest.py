"""The manifest: a pydantic description of everything in a file that is not a tensor.

The manifest travels as JSON in the safetensors header (``__metadata__["sb3_safe_save"]``), so it
can be read and validated without touching the tensors and without importing anything the file names.

Values are stored as a tree of *nodes*: JSON scalars stay as they are, everything else is a small
tagged object (``{"kind": "ndarray", ...}``). Which Python types map to which node is decided by the
codecs (``_codecs.py``); this module only defines and validates the shapes.

Format versions
---------------
``FORMAT_VERSION`` is the version this release writes. Bump it when a file written by the new code
could be misread by an old loader (a new node kind, a changed field meaning). Keep the loader for
every older version (see ``_load_manifest``), and add a golden file for the new version under
``tests/data/``. Adding an optional field with a default that old files implicitly have is not a bump.

* **1** (sb3_safe_save 0.1): first version.
* **2** (sb3_safe_save 0.2): the ``schedule`` node kind (schedules stored as data), ``random_state``
  (exact resume), ``Placeholder.external_paths`` (``external()``), ``content`` (``"agent"`` or
  ``"policy"`` for ``save_policy`` files). A 0.1 loader would refuse these files with a validation
  error; with the bump it says to upgrade. Version 1 files load unchanged (every new field has the
  default they implicitly have).
"""

from __future__ import annotations

import functools
import json
import keyword
import re
from collections.abc import Callable, Iterable
from types import UnionType
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import VERSION as PYDANTIC_VERSION
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, PydanticKnownError

from sb3_safe_save._errors import FormatError, UnsupportedVersionError

FORMAT_NAME: Final = "sb3_safe_save"
FORMAT_VERSION: Final = 2
SUPPORTED_VERSIONS = frozenset({1, 2})

#: ``__metadata__`` keys of the safetensors header.
META_MANIFEST = "sb3_safe_save"
META_CHECKSUM = "sb3_safe_save.xxh3_128"


def _takes_fail_fast(annotation: Any) -> bool:
    """Whether this pydantic takes ``Field(fail_fast=True)`` on a field of this type: lists from 2.8, dicts from 2.14."""
    if tuple(map(int, PYDANTIC_VERSION.split(".")[:2])) < (2, 8):  # older ones warn about an unknown Field argument
        return False
    try:
        create_model("_FailFastProbe", x=(annotation, Field(fail_fast=True)))
    except (RuntimeError, TypeError):  # 2.8-2.13 on a dict: "Unable to apply constraint 'fail_fast' to schema of type 'dict'"
        return False
    return True


#: Whether pydantic itself stops a list / a dict field at its first bad item (``Field(fail_fast=True)``). Where it
#: cannot, ``_Model`` validates such a field one item at a time (``_first_bad_item``): either way a bad manifest
#: yields a handful of errors, not one (or six) per value, which cost kilobytes each.
LIST_FAIL_FAST: Final = _takes_fail_fast(list[int])
DICT_FAIL_FAST: Final = _takes_fail_fast(dict[str, int])


def list_field(**constraints: Any) -> Any:
    """``Field(**constraints)`` for a list field, failing fast natively where pydantic can (``LIST_FAIL_FAST``)."""
    return Field(**constraints, **_fail_fast(LIST_FAIL_FAST))


def items_field(**constraints: Any) -> Any:
    """``Field(**constraints)`` for a dict (or list) field, failing fast natively where pydantic can on both kinds."""
    return Field(**constraints, **_fail_fast(DICT_FAIL_FAST))


def _fail_fast(native: bool) -> dict[str, Any]:
    return {"fail_fast": True} if native else {}


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEX128 = re.compile(r"[0-9a-f]{32}")
MAX_DIM = 2**48
MAX_ITEMS = 1_000_000
#: Bounds checked on the raw JSON before pydantic sees it (``check_json_shape``): a real manifest
#: nests about 15 levels and holds a few thousand values.
MAX_JSON_DEPTH = 128
MAX_JSON_VALUES = 2_000_000


def _ident_end(text: str, pos: int) -> int:
    """The end of the identifier starting at ``pos`` (``pos`` itself if there is none)."""
    m = _IDENT_RE.match(text, pos)
    return pos if m is None else m.end()


def check_path(path: str) -> str:
    """Validate an attribute path such as ``policy.q_net.vlm_model`` or ``policy_kwargs[net_arch][0]``.

    One left-to-right scan (linear time, no backtracking): an identifier, then ``.identifier`` or
    ``[key]`` (1 to 200 characters, no brackets) parts. Dunder components (``__class__``) are refused:
    a path may only name ordinary attributes.
    """
    n = len(path)
    ok = 0 < n <= 1000 and (i := _ident_end(path, 0)) > 0
    while ok and i < n:
        if path[i] == ".":
            j = _ident_end(path, i + 1)
            ok, i = j > i + 1, j
        elif path[i] == "[":
            j = path.find("]", i + 1, i + 202)
            ok = j > i + 1 and "[" not in path[i + 1 : j]
            i = j + 1
        else:
            ok = False
    if not ok:
        raise ValueError(f"invalid attribute path {path[:200]!r}")
    for part in re.split(r"[.\[\]]", path):
        if part.startswith("__") and part.endswith("__"):
            raise ValueError(f"attribute path {path[:200]!r} names a dunder attribute")
    return path


def check_ref(ref: str) -> str:
    """Validate an import reference ``module.sub:Qual.name`` (no dunders; ``<locals>`` only inside the
    qualname, for a class defined in a function: see ``_trust.LOCALS``); linear time."""
    module, colon, qualname = ref.partition(":")
    qual = qualname.split(".")
    parts = [*module.split("."), *qual]
    valid = all(_IDENT_RE.fullmatch(p) for p in module.split(".")) and all(
        _IDENT_RE.fullmatch(p) or (p == "<locals>" and i < len(qual) - 1) for i, p in enumerate(qual)
    )
    if len(ref) > 500 or not colon or not valid:
        raise ValueError(f"invalid import reference {ref[:200]!r} (expected 'package.module:QualName')")
    if any(p.startswith("__") and p.endswith("__") and p != "__main__" for p in parts):
        raise ValueError(f"import reference {ref!r} names a dunder attribute")
    return ref


Ref = Annotated[str, AfterValidator(check_ref)]
AttrPath = Annotated[str, AfterValidator(check_path)]


#: The names of the list and dict fields whose items can be bad (not ``dict[str, Any]``) of the models here and in
#: ``_buffers``, ``_vecnormalize`` and ``_checkpoint``: ``_Model`` validates these one item at a time where pydantic
#: cannot fail fast on them. Not ``"*"``: pydantic refuses a wrap validator on a discriminator field (``kind``).
#: ``tests/test_bounds.py`` checks that the list is complete.
CONTAINER_FIELDS: Final = (
    *("items", "args", "state", "fields", "shape", "knots", "fingerprint", "hint", "paths", "external_paths"),
    *("keys", "aliases", "external_prefixes", "dropped", "norm_obs_keys", "obs_keys", "old_obs_keys", "numpy_scalars"),
    *("spaces", "envs", "env_seeds", "gsde", "data", "state_dicts", "torch_variables", "placeholders", "tensors"),
    *("hazards", "counters", "callbacks"),
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    if not DICT_FAIL_FAST:  # pydantic < 2.14: see LIST_FAIL_FAST

        @field_validator(*CONTAINER_FIELDS, mode="wrap", check_fields=False)
        @classmethod
        def _first_bad_item(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
            assert info.field_name is not None  # a field validator always has one
            return _one_item_at_a_time(value, handler, _container(cls, info.field_name))


@functools.cache
def _container(model: type[BaseModel], name: str) -> tuple[type, int | None] | None:
    """``(list or dict, max_length)`` of a container field that pydantic does not fail fast on, else None.

    None too for a ``min_length`` over 1, which a one-item list would fail (no field here has one).
    """
    field = model.model_fields[name]
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):  # ``list[str] | None``
        (annotation, *others) = [a for a in get_args(annotation) if a is not type(None)]
        if others:
            return None
    kind = get_origin(annotation)
    if kind not in (list, dict) or any(getattr(m, "fail_fast", False) for m in field.metadata):
        return None
    min_len = max((m.min_length for m in field.metadata if isinstance(m, annotated_types.MinLen)), default=0)
    max_len = min((m.max_length for m in field.metadata if isinstance(m, annotated_types.MaxLen)), default=None)
    return None if min_len > 1 else (kind, max_len)


def _one_item_at_a_time(value: Any, handler: ValidatorFunctionWrapHandler, container: tuple[type, int | None] | None) -> Any:
    """Validate a list or dict field one item at a time through ``handler``, stopping at the first bad item.

    Each item is validated once (``handler([item])``, ``handler({key: item})``), so the cost stays linear in the
    input however deep it nests; a field that is not a container, an input of another type and one of at most
    one item go to ``handler`` whole.
    """
    if container is None or not isinstance(value, (list, dict)) or type(value) is not container[0] or len(value) <= 1:
        return handler(value)  # not a container field, not its type, or at most one item (none: for min_length)
    kind, max_len = container
    if max_len is not None and len(value) > max_len:  # pydantic's own error, before looking at any item
        field_type = "List" if kind is list else "Dictionary"
        raise PydanticKnownError("too_long", {"field_type": field_type, "max_length": max_len, "actual_length": len(value)})
    if isinstance(value, dict):  # an error's location starts with the key already
        out: dict[Any, Any] = {}
        for key, item in value.items():
            out.update(handler({key: item}))
        return out
    items: list[Any] = []
    for i, item in enumerate(value):
        try:
            items.extend(handler([item]))
        except ValidationError as e:
            raise _at_index(e, i) from None
    return items


def _at_index(e: ValidationError, index: int) -> ValidationError:
    """``e``, raised for the one-item list ``[item]``, as if for the item at ``index`` (locations start with ``index``)."""
    errors = e.errors(include_url=False, include_context=False)
    line_errors: list[InitErrorDetails] = [
        {"type": PydanticCustomError(err["type"], err["msg"]), "loc": (index, *err["loc"][1:]), "input": err["input"]}
        for err in errors
    ]
    return ValidationError.from_exception_data(e.title, line_errors)


# --------------------------------------------------------------------------------------------- nodes
Scalar = Union[None, StrictBool, StrictInt, StrictFloat, StrictStr]  # noqa: UP007 - a runtime alias pydantic reads


class ListNode(_Model):
    kind: Literal["list"] = "list"
    items: list[Node] = list_field(max_length=MAX_ITEMS)


class TupleNode(_Model):
    kind: Literal["tuple"] = "tuple"
    items: list[Node] = list_field(max_length=MAX_ITEMS)


class DictNode(_Model):
    kind: Literal["dict"] = "dict"
    items: dict[str, Node] = items_field(max_length=MAX_ITEMS)
    key_type: Literal["str", "int"] = "str"
    ordered: bool = False


class DequeNode(_Model):
    kind: Literal["deque"] = "deque"
    items: list[Node] = list_field(max_length=MAX_ITEMS)
    maxlen: int | None = Field(default=None, ge=0, le=MAX_ITEMS)


class FloatNode(_Model):
    """A non-finite Python float (JSON has no NaN or infinity)."""

    kind: Literal["float"] = "float"
    value: Literal["nan", "inf", "-inf"]


class RefNode(_Model):
    """A class or function referenced by import path; it must pass the trust list at load."""

    kind: Literal["ref"] = "ref"
    ref: Ref


class ArrayNode(_Model):
    """A numpy array whose bytes are the tensor ``tensor`` in the file body."""

    kind: Literal["ndarray"] = "ndarray"
    tensor: str
    dtype: str
    shape: list[Annotated[int, Field(ge=0, le=MAX_DIM)]] = list_field(max_length=64)


class NumpyScalarNode(_Model):
    kind: Literal["np_scalar"] = "np_scalar"
    dtype: str
    value: StrictBool | StrictInt | StrictFloat | Literal["nan", "inf", "-inf"]


class TensorNode(_Model):
    """A torch tensor whose bytes are the tensor ``tensor`` in the file body."""

    kind: Literal["tensor"] = "tensor"
    tensor: str
    requires_grad: bool = False


class DeviceNode(_Model):
    kind: Literal["device"] = "device"
    value: str = Field(max_length=64)


class TorchDtypeNode(_Model):
    kind: Literal["torch_dtype"] = "torch_dtype"
    name: str = Field(max_length=64)


class NumpyDtypeNode(_Model):
    kind: Literal["np_dtype"] = "np_dtype"
    value: str = Field(max_length=64)


class SpaceNode(_Model):
    """A gymnasium space, rebuilt from its constructor arguments (no import: the type is a fixed name)."""

    kind: Literal["space"] = "space"
    space: Literal["Box", "Discrete", "MultiDiscrete", "MultiBinary", "Dict", "Tuple"]
    args: dict[str, Node] = items_field(max_length=100)
    rng: dict[str, Any] | None = None


class ObjectNode(_Model):
    """A plain object of a trusted class, rebuilt with ``cls.__new__`` and its ``__dict__``."""

    kind: Literal["object"] = "object"
    cls: Ref
    state: dict[str, Node] = items_field(max_length=MAX_ITEMS)


class EnumNode(_Model):
    kind: Literal["enum"] = "enum"
    cls: Ref
    value: Scalar


class NamedTupleNode(_Model):
    kind: Literal["namedtuple"] = "namedtuple"
    cls: Ref
    fields: dict[str, Node] = items_field(max_length=1000)


class PlaceholderNode(_Model):
    """Stands where a live resource was; ``key`` names an entry of ``Manifest.placeholders``."""

    kind: Literal["placeholder"] = "placeholder"
    key: str = Field(max_length=200)


MAX_KNOTS = 10_000


class ScheduleNode(_Model):
    """A schedule (learning rate, clip range, exploration rate...) stored as data, never as code.

    * ``constant`` (``args``: ``val``), ``linear`` (``start``, ``end``, ``end_fraction``) and ``float``
      (``value_schedule``, the wrapped schedule) are SB3's own schedules: before SB3 2.7 the closures of
      ``constant_fn``, ``get_linear_fn`` and ``get_schedule_fn``, recognised by their code object. They are
      rebuilt with the installed SB3's schedule classes (or, before 2.7, its functions); nothing is imported.
    * ``piecewise_linear`` is any other schedule function, sampled at save and kept only if the
      interpolation through ``knots`` (``[progress_remaining, value]`` pairs, extended linearly beyond
      the ends) reproduced it at every checked point (``_codecs.sample_schedule`` says which).
      ``source`` names the sampled function, for people; it is never imported.
    """

    kind: Literal["schedule"] = "schedule"
    schedule: Literal["constant", "linear", "float", "piecewise_linear"]
    args: dict[str, Node] = items_field(default_factory=dict, max_length=8)
    knots: list[tuple[StrictFloat, StrictFloat]] = list_field(default_factory=list, max_length=MAX_KNOTS)
    source: str | None = Field(default=None, max_length=500)
    checked_points: int = Field(default=0, ge=0)
    max_error: StrictFloat = 0.0


class PickleNode(_Model):
    """An explicitly allowed cloudpickle fallback; its bytes are the uint8 tensor ``tensor``."""

    kind: Literal["pickle"] = "pickle"
    tensor: str
    type: str = Field(max_length=500)


def _kind(value: Any) -> str | None:
    """``TaggedNode``'s discriminator: the ``kind`` of a JSON object or of a built node."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else None


# Each value goes through one branch once, however deep it nests. Before pydantic 2.6 a plain union tries each branch
# twice (strict, then lax) and keeps every error, and pydantic 2.5 drops ``Field(discriminator="kind")`` inside these
# recursive models (a plain union again): ten levels of nested bad nodes cost pydantic 2.5.3 1.5 million errors, 4 GB
# and two minutes. So ``TaggedNode`` is discriminated by a function and ``Node`` tries its two branches left to right
# (scalar first: a Python call per scalar value would make large lists several times slower to validate).
TaggedNode = Annotated[
    Union[  # noqa: UP007 - a runtime alias pydantic reads
        Annotated[ListNode, Tag("list")],
        Annotated[TupleNode, Tag("tuple")],
        Annotated[DictNode, Tag("dict")],
        Annotated[DequeNode, Tag("deque")],
        Annotated[FloatNode, Tag("float")],
        Annotated[RefNode, Tag("ref")],
        Annotated[ArrayNode, Tag("ndarray")],
        Annotated[NumpyScalarNode, Tag("np_scalar")],
        Annotated[TensorNode, Tag("tensor")],
        Annotated[DeviceNode, Tag("device")],
        Annotated[TorchDtypeNode, Tag("torch_dtype")],
        Annotated[NumpyDtypeNode, Tag("np_dtype")],
        Annotated[SpaceNode, Tag("space")],
        Annotated[ObjectNode, Tag("object")],
        Annotated[EnumNode, Tag("enum")],
        Annotated[NamedTupleNode, Tag("namedtuple")],
        Annotated[PlaceholderNode, Tag("placeholder")],
        Annotated[PickleNode, Tag("pickle")],
        Annotated[ScheduleNode, Tag("schedule")],
    ],
    Discriminator(_kind),
]
# No ``Tag`` on the two branches (shorter error locations): with them pydantic 2.9 warns on every save.
Node = Annotated[Union[Scalar, TaggedNode], Field(union_mode="left_to_right")]  # noqa: UP007 - as above
# The models are built on first use (``defer_build``): building the recursive node schema costs
# ~100 ms, which ``import sb3_safe_save`` should not pay.


# ------------------------------------------------------------------------------------ placeholders
class ResourceSpec(_Model):
    """How to rebuild a resource at load: a factory reference plus JSON keyword arguments.

    :param factory: ``"package.module:function"``; imported at load only if trusted
    :param kwargs: JSON-able keyword arguments for the factory
    :param fingerprint: optional values compared with the rebound object's fingerprint
    :param lazy: bind a proxy that builds the object on first use
    """

    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    fingerprint: dict[str, Scalar] | None = items_field(default=None, max_length=1000)
    lazy: bool = False

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, v: str | None) -> str | None:
        return None if v is None else check_ref(v)

    @field_validator("kwargs")
    @classmethod
    def _check_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ResourceSpec kwargs must be JSON (str, int, float, bool, None, lists, dicts): {e}") from None
        return v


Reason = Literal["unpicklable", "too_large", "external_module", "declared", "external", "schedule"]


class Placeholder(_Model):
    """One live resource left out of the file, found at one or more attribute paths."""

    key: str = Field(min_length=1, max_length=200)
    paths: list[str] = list_field(min_length=1, max_length=10_000)
    type: str = Field(max_length=500)
    reason: Reason
    size_bytes: int | None = Field(default=None, ge=0)
    hint: dict[str, Scalar] = items_field(default_factory=dict, max_length=1000)
    optional: bool = False
    spec: ResourceSpec | None = None
    #: the paths (a subset of ``paths``) that held it through ``external()``: load puts a wrapper back there
    external_paths: list[str] = list_field(default_factory=list, max_length=10_000)

    @field_validator("paths", "external_paths")
    @classmethod
    def _check_paths(cls, v: list[str]) -> list[str]:
        return [check_path(p) for p in v]


# -------------------------------------------------------------------------------------- state dicts
class ModuleState(_Model):
    """A module's ``state_dict``: key ``k`` is stored as tensor ``f"{name}/{k}"`` unless it is an alias."""

    kind: Literal["module"] = "module"
    name: AttrPath
    keys: list[str] = list_field(max_length=MAX_ITEMS)
    aliases: dict[str, str] = items_field(default_factory=dict, max_length=MAX_ITEMS)
    external_prefixes: list[str] = list_field(default_factory=list, max_length=10_000)


class OptimizerState(_Model):
    """An optimizer's ``state_dict`` as a node tree (its tensors are in the body).

    ``dropped`` lists the parameter indices whose state was left out because they belong to an
    external resource; ``param_groups`` stay intact.
    """

    kind: Literal["optimizer"] = "optimizer"
    name: AttrPath
    state: Node
    dropped: list[int] = list_field(default_factory=list, max_length=MAX_ITEMS)


StateEntry = Annotated[ModuleState | OptimizerState, Field(discriminator="kind")]


class TensorMeta(_Model):
    dtype: str = Field(max_length=16)
    shape: list[Annotated[int, Field(ge=0, le=MAX_DIM)]] = list_field(max_length=64)
    xxh3: str

    @field_validator("xxh3")
    @classmethod
    def _check_hash(cls, v: str) -> str:
        if not _HEX128.fullmatch(v):
            raise ValueError("xxh3 must be 32 lowercase hex digits")
        return v


class Hazard(_Model):
    """Something found while walking that will likely hurt the user, recorded for the audit."""

    code: Literal["shared_with_target", "external_in_optimizer", "reinitialised_on_build"]
    severity: Literal["info", "warning", "error"]
    message: str = Field(max_length=2000)
    paths: list[str] = list_field(default_factory=list, max_length=10_000)


VersionText = Annotated[str, Field(max_length=100)]


class Versions(_Model):
    sb3_safe_save: VersionText
    stable_baselines3: VersionText
    torch: VersionText
    numpy: VersionText
    python: VersionText
    gymnasium: VersionText | None = None
    sb3_contrib: VersionText | None = None


JsonFloat = StrictFloat | StrictInt | Literal["inf", "-inf", "nan"]


class VecNormalizeState(_Model):
    """A ``VecNormalize`` wrapper: its settings here, its statistics as float64 tensors (``_vecnormalize.py``).

    Tensor names, relative to a prefix (``vec_normalize/``): ``obs_rms/mean|var|count`` (or
    ``obs_rms/<key>/...`` for each of ``obs_keys`` of a Dict space), ``ret_rms/mean|var|count``,
    ``old_reward``, ``old_obs`` (or ``old_obs/<key>``) when the wrapper has stepped, and ``returns``
    (the running discounted return of each env, float64) when ``has_returns``: files written before
    it was stored have none, and load zeros, as ``VecNormalize.set_venv`` does.
    """

    training: bool
    norm_obs: bool
    norm_reward: bool
    clip_obs: JsonFloat
    clip_reward: JsonFloat
    gamma: JsonFloat
    epsilon: JsonFloat
    norm_obs_keys: list[str] | None = list_field(default=None, max_length=MAX_ITEMS)
    has_obs_rms: bool = True
    obs_keys: list[str] | None = list_field(default=None, max_length=MAX_ITEMS)
    old_obs: Literal["none", "array", "dict"] = "none"
    old_obs_keys: list[str] | None = list_field(default=None, max_length=MAX_ITEMS)
    numpy_scalars: list[str] = list_field(
        default_factory=list, max_length=1000
    )  # 0-d tensors that were np.float64, not arrays
    has_returns: bool = False

    @model_validator(mode="after")
    def _check_obs_rms(self) -> VecNormalizeState:
        """``normalize_obs`` reads ``obs_rms`` (per key of ``norm_obs_keys`` for a Dict space) whenever ``norm_obs``."""
        if not self.norm_obs:
            return self
        if not self.has_obs_rms:
            raise ValueError("norm_obs is true but there are no obs_rms statistics to normalize observations with")
        if (self.obs_keys is None) != (self.norm_obs_keys is None):
            raise ValueError("obs_keys and norm_obs_keys must both be given (a Dict space) or both be absent")
        missing = sorted(set(self.norm_obs_keys or ()) - set(self.obs_keys or ()))
        if missing:
            raise ValueError(f"norm_obs_keys {missing[:5]} have no obs_rms statistics")
        return self


class RandomState(_Model):
    """The random state that training draws from, restored at load so a resumed run continues exactly (``_rng.py``).

    Tensors (relative to the prefix ``rng/``), all uint8 bytes: ``torch_cpu`` and ``torch_cuda/<i>``
    (torch's generator states), ``numpy_key`` (numpy's global MT19937 key, 624 uint32), ``python``
    (``random``'s Mersenne Twister state, 625 uint32) and, for gSDE, ``gsde/<module>/exploration_mat`` /
    ``exploration_matrices`` (float tensors). Space and env generator states are JSON (``bit_generator``
    name plus its state).
    """

    torch_cuda: int = Field(default=0, ge=0, le=1024)
    numpy_pos: int = Field(ge=0, le=624)
    numpy_has_gauss: Literal[0, 1]
    # the cached Gaussians are the next normal draws: finite (a NaN would be drawn later)
    numpy_gauss: StrictFloat = Field(allow_inf_nan=False)
    python_version: Literal[3] = 3
    python_gauss: StrictFloat | None = Field(default=None, allow_inf_nan=False)
    spaces: dict[Literal["observation_space", "action_space"], dict[str, Any]] = items_field(
        default_factory=dict, max_length=2
    )
    envs: list[dict[str, Any] | None] | None = list_field(default=None, max_length=4096)
    env_seeds: list[Annotated[StrictInt, Field(ge=0)] | None] | None = list_field(default=None, max_length=4096)
    gsde: dict[AttrPath, list[Literal["exploration_mat", "exploration_matrices"]]] = items_field(
        default_factory=dict, max_length=64
    )


class Manifest(_Model):
    """Everything in a saved agent except tensor bytes."""

    format: Literal["sb3_safe_save"] = FORMAT_NAME
    format_version: Literal[1, 2] = FORMAT_VERSION
    versions: Versions
    algorithm: str
    base_algorithm: str
    data: dict[str, Node] = items_field(max_length=100_000)
    state_dicts: list[StateEntry] = list_field(max_length=1000)
    torch_variables: dict[str, Node] = items_field(default_factory=dict, max_length=1000)
    placeholders: list[Placeholder] = list_field(default_factory=list, max_length=10_000)
    tensors: dict[str, TensorMeta] = items_field(max_length=MAX_ITEMS)
    hazards: list[Hazard] = list_field(default_factory=list, max_length=1000)
    vec_normalize: VecNormalizeState | None = None
    random_state: RandomState | None = None
    #: ``"policy"``: a policy-only file written by ``save_policy`` (``algorithm`` then names the policy class).
    content: Literal["agent", "policy"] = "agent"

    @field_validator("algorithm", "base_algorithm")
    @classmethod
    def _check_ref(cls, v: str) -> str:
        return check_ref(v)

    @field_validator("data", "torch_variables")
    @classmethod
    def _check_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            check_path(key)
            if "." in key or "[" in key:
                raise ValueError(f"attribute name {key!r} must be a plain identifier")
        return v

    def placeholder(self, key: str) -> Placeholder:
        for p in self.placeholders:
            if p.key == key:
                return p
        raise FormatError(f"the manifest uses placeholder {key!r} but does not describe it; the file is malformed")


def parse_manifest(text: str) -> Manifest:
    """Parse and validate manifest JSON. Imports nothing. Raises ``FormatError`` or ``UnsupportedVersionError``."""
    raw = load_json(text, "the manifest")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise FormatError("the header has no sb3_safe_save manifest: this is not a file written by sb3_safe_save")
    version = raw.get("format_version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"format version {version!r} is not supported by this release (it reads {sorted(SUPPORTED_VERSIONS)}); "
            "upgrade sb3_safe_save to load this file"
        )
    try:
        return Manifest.model_validate(raw)
    except (ValidationError, RecursionError) as e:
        raise FormatError(f"the manifest is malformed: {_short(e)}") from None


_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def load_json(text: str, what: str) -> Any:
    """``json.loads`` for text from a file, bounded and strict.

    Refuses (``FormatError``) invalid JSON, lone UTF-16 surrogates (they cannot be encoded or printed
    later), nesting deeper than ``MAX_JSON_DEPTH`` and more than ``MAX_JSON_VALUES`` values, so
    that validation work stays proportional to the text and small.

    :param text: the JSON text
    :param what: what it is, for the messages ("the manifest")
    """
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON: {_short(e, 200)}") from None
    if _LONE_SURROGATE_ESCAPE.search(text) is not None or not _encodable(text):
        check_encodable(raw, what)
    check_json_shape(raw, what)
    return raw


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_encodable(value: Any, what: str) -> None:
    """Refuse strings (keys included) that UTF-8 cannot encode: lone surrogates from ``\\udXXX`` escapes."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{what} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None


def check_json_shape(value: Any, what: str) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH`` or holding more than ``MAX_JSON_VALUES`` values.

    Iterative, one level at a time; only containers are visited, so the cost is one step per container.
    """
    count, depth = 1, 1
    level = [value] if isinstance(value, (dict, list)) else []
    while level:
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; no saved agent does")
        below: list[Any] = []
        for v in level:
            children = v.values() if isinstance(v, dict) else v
            count += len(children)
            if count > MAX_JSON_VALUES:
                raise FormatError(f"{what} holds more than {MAX_JSON_VALUES} JSON values; no saved agent has that many")
            below.extend(c for c in children if isinstance(c, (dict, list)))
        level, depth = below, depth + 1


#: How pydantic names the branches of ``Node`` in an error's location: ``_short`` writes ``tagged-union[ListNode,...]``
#: as ``node``, and leaves out the scalar alternatives of a bad node.
_TAGGED_UNION = re.compile(r"tagged-union\[[^\]]*\]")
_SCALAR_BRANCHES = {("bool",), ("int",), ("float",), ("str",)}


def _short(e: Exception, limit: int = 2000) -> str:
    if isinstance(e, ValidationError):  # str(e) repeats every input: megabytes for a deep, hostile manifest
        if e.error_count() > 1000:  # not from a model here (they fail fast): formatting them all costs gigabytes
            return f"{e.error_count()} validation errors (the first: {e.title} at {_first_loc(e)})"
        errors = e.errors(include_url=False, include_input=False)  # few: every container field fails fast
        # the deepest error says most, and union alternatives say little: a bad node was not meant as a scalar
        errors.sort(key=lambda err: -len(err["loc"]))
        errors = [err for err in errors if err["loc"][-1:] not in _SCALAR_BRANCHES] or errors
        lines = [
            f"{_clip(_TAGGED_UNION.sub('node', '.'.join(map(str, err['loc']))))}: {err['msg'][:300]}" for err in errors[:3]
        ]
        text = f"{e.error_count()} validation error(s): " + "; ".join(lines)
    else:
        text = str(e)
    return text if len(text) <= limit else text[:limit] + " ..."


def _first_loc(e: ValidationError) -> str:
    first = next(iter(e.errors(include_url=False, include_input=False, include_context=False)), None)
    return "?" if first is None else _clip(".".join(map(str, first["loc"])))


def _clip(loc: str) -> str:
    """A location of at most 300 characters: its start (the attribute) and its end (where the error is)."""
    return loc if len(loc) <= 300 else f"{loc[:100]} ... {loc[-195:]}"


def child_path(path: str, key: object) -> str:
    """The path of a child: ``a.b`` for identifier keys, ``a[3]`` / ``a[some key]`` otherwise (codecs use it too)."""
    if isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key):
        return f"{path}.{key}"
    return f"{path}[{key}]"


_NAMED_CHILDREN: dict[type, Callable[[Any], Iterable[tuple[object, Node]]]] = {
    ListNode: lambda n: enumerate(n.items),
    TupleNode: lambda n: enumerate(n.items),
    DequeNode: lambda n: enumerate(n.items),
    DictNode: lambda n: n.items.items(),
    SpaceNode: lambda n: n.args.items(),
    ObjectNode: lambda n: n.state.items(),
    NamedTupleNode: lambda n: n.fields.items(),
    ScheduleNode: lambda n: n.args.items(),
}


def iter_paths(node: Node, path: str, skip: Callable[[str], bool] = lambda _: False) -> list[tuple[str, Node]]:
    """``(path, node)`` for the tree below (and including) ``node``, leaving out subtrees whose path ``skip`` accepts."""
    out: list[tuple[str, Node]] = []
    stack: list[tuple[str, Node]] = [(path, node)]
    while stack:
        p, n = stack.pop()
        if skip(p):
            continue
        out.append((p, n))
        children = _NAMED_CHILDREN.get(type(n))
        if children is not None:
            stack.extend((child_path(p, k), c) for k, c in children(n))
    return out


def iter_nodes(node: Node) -> list[Node]:
    """Every node of the tree below (and including) ``node``, iteratively (no recursion limit)."""
    out: list[Node] = []
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        out.append(n)
        children = _NAMED_CHILDREN.get(type(n))
        if children is not None:
            stack.extend(c for _, c in children(n))
    return out


def node_refs(node: Node) -> list[str]:
    """The import references a node (not its children) asks to import."""
    if isinstance(node, RefNode):
        return [node.ref]
    if isinstance(node, (ObjectNode, EnumNode, NamedTupleNode)):
        return [node.cls]
    return []
