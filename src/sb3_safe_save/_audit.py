"""The audit: what a save writes (or a file holds), how big each part is, and what needs attention.

``audit(model_or_path)`` works on either input:

* a **live model**: it walks the model exactly as ``save`` would (``snapshot_model``), writes nothing,
  and computes the exact size the file would have (tensor bytes from ``numel * element_size``, no
  copy, plus the real header with the manifest);
* a **file**: it reads the safetensors header only (never the tensor bytes), so its cost does not
  depend on the size of the file.

Severities (``Finding.severity``), and how ``report.ok`` is decided
-------------------------------------------------------------------
=========================  ===========================================================================
finding ``code``           severity
=========================  ===========================================================================
``placeholder``            ``info`` (a resource kept out; ``load`` needs it back). ``error`` when the
                           audit is told not to allow it (``allow_placeholders=False`` or a key list
                           without it); ``assert_save_budget`` disallows placeholders by default.
``pickle``                 ``error``: a cloudpickled value (loading it runs code; saving it needs
                           ``allow_pickle=True``). ``warning`` with ``allow_pickle=True``.
``untrusted_reference``    ``warning``: a class or function ``load`` refuses unless it is trusted.
``refused_reference``      ``error``: a reference ``load`` refuses whatever is trusted (a class of the
                           wrong kind for where it sits, or not defined where it says).
``refused_attribute``      ``error``: a stored attribute, value or placeholder path ``load`` refuses (an
                           attribute SB3's ``save`` never writes, such as ``env``; a rebind path through a
                           class; a ``meta`` device). ``warning`` for a file saved without
                           ``policy_kwargs``: ``load`` needs them from the caller.
``malformed``              ``error``: a structure ``load`` refuses: state dicts or torch variables the
                           algorithm does not have, weights left out with no resource recorded there,
                           tensors missing or never used, random state the model cannot take.
``content``                ``warning``: a policy file (``save_policy``): ``load`` refuses it; the other
                           findings are ``load_policy``'s decisions.
``spec_factory``           ``info``: a placeholder's ``ResourceSpec.factory`` that ``load`` may call
                           (trusted exactly); ``warning`` when untrusted (``load`` never calls it).
``shared_with_target``     ``error`` (``warning`` if ``tau`` is 0): the online and target networks hold
                           parameters with the same storage, which target updates zero (``tau=1.0``) or
                           shrink (``tau<1``) in place.
``reinitialised_on_build`` ``error``: a resource module is registered where ``ortho_init`` re-initialises.
``external_in_optimizer``  ``warning``: a resource's parameters are in an optimizer's param groups.
                           All three are facts about the live model found at save (``external()`` avoids
                           them) and recorded in the file; ``save`` warns ``HazardWarning`` for the errors.
``over_budget``            ``error``: the total size is above ``max_bytes``.
``schedule``               ``info``: a schedule function stored as the knots of a piecewise-linear function
                           that reproduced it at every checked progress value (no code is stored).
=========================  ===========================================================================

Every refusal ``load`` decides from the header and manifest, before it builds anything, is a finding
(``_persist.decide``, the function ``load`` itself runs as its phase 2): if ``load`` refuses a file for
such a reason, ``audit(path, fail_on="warning")`` is not OK.

``report.ok`` is False when the total is over budget, or when any finding's severity is at or above
``fail_on`` (``"error"`` by default; ``None`` checks the budget only).

JSON (``AuditReport.model_dump(mode="json")``, and the CLI's ``--format json``) is a stable interface:
``schema_version`` is bumped on any incompatible change; fields are only added, never renamed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from sb3_safe_save import _weights
from sb3_safe_save._errors import SafeSaveError
from sb3_safe_save._file import _open, _parse
from sb3_safe_save._manifest import (
    META_CHECKSUM,
    META_MANIFEST,
    ArrayNode,
    Manifest,
    ModuleState,
    Node,
    OptimizerState,
    PickleNode,
    ScheduleNode,
    TensorMeta,
    TensorNode,
    iter_nodes,
    iter_paths,
)
from sb3_safe_save._trust import LOCALS, TrustList, TrustSpec

if TYPE_CHECKING:
    import numpy as np
    import torch as th
    from stable_baselines3.common.base_class import BaseAlgorithm

SCHEMA_VERSION: Literal[1] = 1
Severity = Literal["info", "warning", "error"]
FindingCode = Literal[
    "placeholder",
    "pickle",
    "untrusted_reference",
    "refused_reference",
    "refused_attribute",
    "malformed",
    "content",
    "spec_factory",
    "shared_with_target",
    "external_in_optimizer",
    "reinitialised_on_build",
    "over_budget",
    "schedule",
]
ComponentKind = Literal["state_dict", "optimizer", "data", "torch_variables", "pickle", "header", "other"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}
_DUMMY_XXH3 = "0" * 32  # same length as a real checksum: the header size is exact


# ============================================================================================ models
class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class Finding(_Frozen):
    """Something in a save that needs attention.

    :param code: what kind of finding (see the table in the module docstring)
    :param severity: ``"info"``, ``"warning"`` or ``"error"``
    :param message: one line for humans
    :param paths: the attribute paths concerned
    :param key: the placeholder key (``placeholder`` findings)
    :param type: the type of the value (``placeholder``/``pickle``) or the reference (``untrusted_reference``)
    :param reason: why a placeholder was made (``external_module``, ``unpicklable``, ``too_large``, ``declared``, ``schedule``)
    :param size_bytes: bytes kept out of the file (placeholder, estimated) or stored (pickle)
    """

    code: FindingCode
    severity: Severity
    message: str
    paths: list[str] = Field(default_factory=list)
    key: str | None = None
    type: str | None = None
    reason: str | None = None
    size_bytes: int | None = None


class ComponentSize(_Frozen):
    """Bytes taken by one part of the file (a state dict, an optimizer, the data arrays, the header...)."""

    name: str
    kind: ComponentKind
    tensors: int
    bytes: int


class TensorSize(_Frozen):
    name: str
    dtype: str
    shape: list[int]
    bytes: int


class AttributeSize(_Frozen):
    """Bytes taken by one top-level attribute: its tensors plus its JSON in the manifest."""

    name: str
    kind: Literal["data", "state_dict", "optimizer", "torch_variable"]
    bytes: int


class AuditReport(_Frozen):
    """The result of ``audit``; ``model_dump(mode="json")`` is the documented JSON (``schema_version`` 1).

    :param schema_version: version of this JSON layout
    :param source: the file path, or ``"<live Algo model>"``
    :param source_kind: ``"file"`` or ``"model"``
    :param algorithm: ``"module:Class"`` of the saved algorithm
    :param format_version: the file format version (what a live model's save would write)
    :param total_bytes: the file's size (for a live model: what ``save`` would write, exactly)
    :param header_bytes: length prefix + JSON header (the manifest lives there)
    :param manifest_bytes: the manifest JSON alone
    :param tensor_bytes: all tensor bytes
    :param kept_out_bytes: estimated bytes of the placeholders, not in the file
    :param max_bytes: the budget (None: no budget)
    :param over_budget: ``total_bytes > max_bytes``
    :param fail_on: the severity at or above which a finding fails the audit (None: budget only)
    :param ok: the verdict
    :param components: bytes per component; they add up to ``total_bytes``
    :param largest_tensors: the largest tensors, largest first
    :param largest_attributes: the largest top-level attributes, largest first
    :param findings: everything that needs attention, most severe first
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    source: str
    source_kind: Literal["file", "model"]
    algorithm: str
    format_version: int
    total_bytes: int
    header_bytes: int
    manifest_bytes: int
    tensor_bytes: int
    kept_out_bytes: int
    max_bytes: int | None
    over_budget: bool
    fail_on: Severity | None
    ok: bool
    components: list[ComponentSize]
    largest_tensors: list[TensorSize]
    largest_attributes: list[AttributeSize]
    findings: list[Finding]

    def failing(self) -> list[Finding]:
        """The findings that make ``ok`` False (over budget, or at or above ``fail_on``)."""
        limit = None if self.fail_on is None else SEVERITY_RANK[self.fail_on]
        return [
            f for f in self.findings if f.code == "over_budget" or (limit is not None and SEVERITY_RANK[f.severity] >= limit)
        ]

    def summary(self) -> str:
        """One line: verdict, size, budget and the count of findings per severity."""
        counts = {s: sum(f.severity == s for f in self.findings) for s in ("error", "warning", "info")}
        budget = "" if self.max_bytes is None else f" / budget {format_size(self.max_bytes)}"
        found = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n) or "no findings"
        return f"{'OK' if self.ok else 'FAIL'}: {self.source}: {format_size(self.total_bytes)}{budget}; {found}"

    def table(self, *, color: bool = False) -> str:
        """The report as aligned text tables (what the CLI prints)."""
        return render_text(self, color=color)

    def markdown(self) -> str:
        """The report as GitHub-flavoured markdown, short enough for a PR comment."""
        return render_markdown(self)


# ============================================================================================ sizes
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"5 MB"`` (10**6), ``"5MiB"`` (2**20), ``"500KB"`` or ``"1.5 GiB"``.

    :param value: a non-negative number of bytes, or a number with a unit (B, kB, KiB, MB, MiB, GB, GiB, TB, TiB)
    :return: the number of bytes
    :raises ValueError: for anything else
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"not a size: {value!r} (examples: 5000000, '5 MB', '5MiB', '500KB', '1.5 GiB')")


def format_size(n: int | float) -> str:
    """Human-readable binary size: ``512 B``, ``1.5 KiB``, ``26.1 GiB``."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


# ============================================================================================ audit
class _Layout:
    """What the analysis needs, from a live snapshot or from a file header."""

    def __init__(
        self,
        manifest: Manifest,
        tensors: Mapping[str, tuple[str, tuple[int, ...], int]],
        header_bytes: int,
        manifest_bytes: int,
        algo: type | None = None,
    ) -> None:
        self.algo = algo  # the class whose load decisions the audit makes (the live model's class)
        self.manifest = manifest
        self.tensors = tensors  # key -> (dtype, shape, nbytes)
        self.header_bytes = header_bytes
        self.manifest_bytes = manifest_bytes


def audit(
    model_or_path: BaseAlgorithm | str | os.PathLike[str],
    *,
    max_bytes: int | str | None = None,
    fail_on: Severity | None = "error",
    allow_placeholders: bool | Collection[str] = True,
    allow_pickle: bool = False,
    trusted: TrustSpec | None = None,
    exclude: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    resources: Mapping[str, Any] | None = None,
    max_object_bytes: int | None = None,
    top: int = 10,
    algo: type | None = None,
) -> AuditReport:
    """Report what a save writes: sizes per component, largest tensors and attributes, findings, a verdict.

    A live model is walked as ``save`` would walk it and nothing is written; a file is audited from
    its header alone (its tensor bytes are never read).

    Example::

        report = audit(model, max_bytes="5 MB")
        print(report.table())
        assert report.ok, report.table()

    :param model_or_path: a live SB3 model, or the path (or URL, e.g. ``s3://bucket/key``) of a file written by ``save``
    :param max_bytes: the size budget: an int or a string such as ``"5 MB"``, ``"5MiB"``, ``"500KB"``
    :param fail_on: findings at or above this severity make ``ok`` False (None: only the budget counts)
    :param allow_placeholders: True, False, or the placeholder keys that are expected; other
        placeholders become ``error`` findings
    :param allow_pickle: pickled values are ``warning`` instead of ``error`` findings
    :param trusted: classes or ``"module:QualName"`` strings, as ``load(..., trusted=)``: the audit makes the
        decisions ``load`` makes with them, on the model's class (a live model), ``algo``, or the
        file's SB3 base algorithm (never on what the file says its algorithm is)
    :param algo: (file) audit as ``algo.load(path)`` would decide (its module and ``safe_save_trusted``)
    :param exclude: (live model) as in ``save``
    :param include: (live model) as in ``save``
    :param resources: (live model) resource key -> live object to leave out, as in ``save``
    :param max_object_bytes: (live model) as in ``save`` (None: save's default)
    :param top: how many of the largest tensors and attributes to list
    :return: the ``AuditReport``
    :raises FormatError: the file is not an sb3_safe_save file, or is malformed
    :raises IntegrityError: the file is truncated or its header does not match its checksum
    """
    budget = None if max_bytes is None else parse_size(max_bytes)
    if fail_on is not None and fail_on not in SEVERITY_RANK:
        raise ValueError(f"fail_on must be 'info', 'warning', 'error' or None, not {fail_on!r}")
    kind: Literal["file", "model"]
    if _is_model(model_or_path):
        model = cast("BaseAlgorithm", model_or_path)
        layout = _live_layout(model, exclude, include, resources, max_object_bytes)
        source, kind = f"<live {type(model).__name__} model>", "model"
    else:
        path = cast("str | os.PathLike[str]", model_or_path)
        layout = _file_layout(path, algo)
        source, kind = os.fspath(path), "file"
    return _analyse(
        layout, source, kind, budget=budget, fail_on=fail_on, allow_placeholders=allow_placeholders,
        allow_pickle=allow_pickle, trusted=trusted, top=top,
    )  # fmt: skip


def assert_save_budget(
    model: BaseAlgorithm | str | os.PathLike[str],
    max_bytes: int | str | None = "5 MB",
    *,
    allow_placeholders: bool | Collection[str] = False,
    allow_pickle: bool = False,
    fail_on: Severity | None = "error",
    trusted: TrustSpec | None = None,
    exclude: Iterable[str] | None = None,
    include: Iterable[str] | None = None,
    resources: Mapping[str, Any] | None = None,
) -> AuditReport:
    """Fail a test when saving ``model`` would exceed ``max_bytes`` or hit a finding; return the report otherwise.

    Example (pytest)::

        def test_agent_save_stays_small():
            model = CustomDQN(CustomDQNPolicy, "CartPole-v1", policy_kwargs={"vlm_model": expert})
            assert_save_budget(model, "5 MB", allow_placeholders=["vlm_model"])

    :param model: a live model or a saved file
    :param max_bytes: the budget (int or ``"5 MB"``-style string; None: no budget)
    :param allow_placeholders: placeholders are errors unless allowed: True, or the expected keys
    :param allow_pickle: accept pickled values (as warnings)
    :param fail_on: findings at or above this severity fail
    :param trusted: references not to report as untrusted
    :param exclude: as in ``save``
    :param include: as in ``save``
    :param resources: as in ``save``
    :return: the ``AuditReport`` (when it passes)
    :raises AssertionError: with the report's table when it does not
    """
    report = audit(
        model, max_bytes=max_bytes, fail_on=fail_on, allow_placeholders=allow_placeholders, allow_pickle=allow_pickle,
        trusted=trusted, exclude=exclude, include=include, resources=resources,
    )  # fmt: skip
    if not report.ok:
        reasons = "; ".join(f.message for f in report.failing())
        raise AssertionError(f"save budget check failed: {reasons}\n\n{report.table()}")
    return report


# ------------------------------------------------------------------------------------------ layouts
def _is_model(obj: object) -> bool:
    """True for a live SB3 model; decided without importing SB3 (an instance means its module is loaded)."""
    base_class = sys.modules.get("stable_baselines3.common.base_class")
    return base_class is not None and isinstance(obj, base_class.BaseAlgorithm)


def _st_dtype(value: th.Tensor | np.ndarray) -> str:
    import numpy as np
    import torch as th

    if isinstance(value, np.ndarray):
        return _weights.st_dtype(th.from_numpy(np.empty(0, dtype=value.dtype)).dtype)
    return _weights.st_dtype(value.dtype)


def _nbytes(value: th.Tensor | np.ndarray) -> int:
    import numpy as np

    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return value.numel() * value.element_size()


def _live_layout(
    model: BaseAlgorithm,
    exclude: Iterable[str] | None,
    include: Iterable[str] | None,
    resources: Mapping[str, Any] | None,
    max_object_bytes: int | None,
) -> _Layout:
    import numpy as np

    from sb3_safe_save._persist import build_manifest, snapshot_model

    # allow_pickle=True: values save would refuse are reported as pickle findings instead of raising
    snapshot = snapshot_model(
        model, exclude, include, resources=resources, allow_pickle=True, max_object_bytes=max_object_bytes
    )
    tensors = {k: (_st_dtype(v), tuple(int(d) for d in v.shape), _nbytes(v)) for k, v in snapshot.tensors.items()}
    manifest = build_manifest(
        model, snapshot, {k: TensorMeta(dtype=d, shape=list(s), xxh3=_DUMMY_XXH3) for k, (d, s, _) in tensors.items()}
    )
    text = manifest.model_dump_json()
    metadata = {"format": "pt", META_MANIFEST: text, META_CHECKSUM: _DUMMY_XXH3}
    zero = np.zeros(1, dtype=np.uint8)
    # zero-stride stand-ins: right nbytes, no memory; _header_bytes only reads dtype, shape and nbytes
    blobs = {k: _weights.Blob(data=np.broadcast_to(zero, (n,)), dtype=d, shape=s) for k, (d, s, n) in tensors.items()}
    header = _weights._header_bytes(blobs, metadata)
    return _Layout(manifest, tensors, 8 + len(header), len(text.encode()), type(model))


def _file_layout(path: str | os.PathLike[str], algo: type | None) -> _Layout:
    with _open(path) as (f, size):
        header, manifest = _parse(f, size)
    tensors = {k: (info.dtype, info.shape, info.nbytes) for k, info in header.tensors.items()}
    if algo is None:  # as a plain safe(Base).load would decide; the file's own "algorithm" is never trusted
        try:
            algo = TrustList(None).resolve(manifest.base_algorithm, "base_algorithm", "algorithm")
        except SafeSaveError:
            algo = None  # no SB3 class loads it: reported as a refused reference
    return _Layout(manifest, tensors, header.body_start, len(header.metadata[META_MANIFEST].encode()), algo)


# ------------------------------------------------------------------------------------------ analysis
def _tensor_keys(nodes: list[Node]) -> list[str]:
    return [n.tensor for n in nodes if isinstance(n, (ArrayNode, TensorNode, PickleNode))]


def _json_size(node: Node) -> int:
    # not pydantic_core.to_json(node): before pydantic 2.6 it cannot serialise a model whose deferred schema
    # (defer_build) was never built ("'MockValSer' object cannot be converted to 'SchemaSerializer'")
    return len(node.model_dump_json() if isinstance(node, BaseModel) else json.dumps(node, ensure_ascii=False))


def _analyse(
    layout: _Layout,
    source: str,
    source_kind: Literal["file", "model"],
    *,
    budget: int | None,
    fail_on: Severity | None,
    allow_placeholders: bool | Collection[str],
    allow_pickle: bool,
    trusted: TrustSpec | None,
    top: int,
) -> AuditReport:
    manifest, tensors = layout.manifest, layout.tensors
    size = {k: n for k, (_, _, n) in tensors.items()}
    # every node tree, walked once: (top-level name, its nodes)
    scans = [(name, iter_nodes(node)) for name, node in manifest.data.items()]
    scans += [(e.name, iter_nodes(e.state)) for e in manifest.state_dicts if isinstance(e, OptimizerState)]
    scans += [(name, iter_nodes(node)) for name, node in manifest.torch_variables.items()]
    nodes_of = dict(scans)
    owner: dict[str, tuple[str, ComponentKind]] = {}
    attributes: list[AttributeSize] = []

    for name, node in manifest.data.items():
        keys = _tensor_keys(nodes_of[name])
        pickled = {n.tensor for n in nodes_of[name] if isinstance(n, PickleNode)}
        for key in keys:
            owner[key] = ("pickled values", "pickle") if key in pickled else ("data arrays", "data")
        attributes.append(AttributeSize(name=name, kind="data", bytes=_json_size(node) + sum(size.get(k, 0) for k in keys)))
    for entry in manifest.state_dicts:
        if isinstance(entry, ModuleState):
            keys = [f"{entry.name}/{k}" for k in entry.keys]
            kind: Literal["state_dict", "optimizer"] = "state_dict"
        else:
            keys = _tensor_keys(nodes_of[entry.name])
            kind = "optimizer"
        for key in keys:
            owner[key] = (entry.name, kind)
        attributes.append(AttributeSize(name=entry.name, kind=kind, bytes=sum(size.get(k, 0) for k in keys)))
    for name in manifest.torch_variables:
        keys = _tensor_keys(nodes_of[name])
        for key in keys:
            owner[key] = ("torch variables", "torch_variables")
        attributes.append(AttributeSize(name=name, kind="torch_variable", bytes=sum(size.get(k, 0) for k in keys)))

    groups: dict[tuple[str, ComponentKind], list[int]] = {}
    for key, n in size.items():
        groups.setdefault(owner.get(key, ("other", "other")), []).append(n)
    components = [ComponentSize(name=name, kind=kind, tensors=len(ns), bytes=sum(ns)) for (name, kind), ns in groups.items()]
    components.append(ComponentSize(name="header (manifest)", kind="header", tensors=0, bytes=layout.header_bytes))
    components.sort(key=lambda c: -c.bytes)
    tensor_bytes = sum(size.values())
    total = layout.header_bytes + tensor_bytes

    findings = _findings(manifest, scans, size, allow_placeholders, allow_pickle)
    findings += _reference_findings(manifest, TrustList(trusted, layout.algo), layout.algo)
    over = budget is not None and total > budget
    if over:
        assert budget is not None
        findings.insert(
            0,
            Finding(
                code="over_budget",
                severity="error",
                message=f"the file is {format_size(total)} ({total} bytes),"
                f" over the budget of {format_size(budget)} ({budget} bytes)",
                size_bytes=total,
            ),
        )
    findings.sort(key=lambda f: -SEVERITY_RANK[f.severity])
    limit = None if fail_on is None else SEVERITY_RANK[fail_on]
    ok = not over and not (limit is not None and any(SEVERITY_RANK[f.severity] >= limit for f in findings))
    largest = sorted(tensors.items(), key=lambda kv: -kv[1][2])[:top]
    return AuditReport(
        source=source,
        source_kind=source_kind,
        algorithm=manifest.algorithm,
        format_version=manifest.format_version,
        total_bytes=total,
        header_bytes=layout.header_bytes,
        manifest_bytes=layout.manifest_bytes,
        tensor_bytes=tensor_bytes,
        kept_out_bytes=sum(p.size_bytes or 0 for p in manifest.placeholders),
        max_bytes=budget,
        over_budget=over,
        fail_on=fail_on,
        ok=ok,
        components=components,
        largest_tensors=[TensorSize(name=k, dtype=d, shape=list(s), bytes=n) for k, (d, s, n) in largest],
        largest_attributes=sorted(attributes, key=lambda a: -a.bytes)[:top],
        findings=findings,
    )


def _placeholder_allowed(key: str, allow: bool | Collection[str]) -> bool:
    if isinstance(allow, bool):
        return allow
    return key in allow


def _findings(
    manifest: Manifest,
    scans: list[tuple[str, list[Node]]],
    size: Mapping[str, int],
    allow_placeholders: bool | Collection[str],
    allow_pickle: bool,
) -> list[Finding]:
    findings: list[Finding] = []
    for ph in manifest.placeholders:
        allowed = _placeholder_allowed(ph.key, allow_placeholders)
        est = f", about {format_size(ph.size_bytes)} kept out" if ph.size_bytes else ""
        findings.append(
            Finding(
                code="placeholder",
                severity="info" if allowed else "error",
                message=f"placeholder {ph.key!r}: a {ph.type} ({ph.reason}{est}) is left out;"
                + (f" {ph.hint.get('detail')}" if ph.reason == "schedule" else f" load needs resources={{{ph.key!r}: ...}}")
                + ("" if allowed else " (not in the allowed placeholders)"),
                paths=list(ph.paths),
                key=ph.key,
                type=ph.type,
                reason=ph.reason,
                size_bytes=ph.size_bytes,
            )
        )
    for _, nodes in scans:
        for node in nodes:
            if isinstance(node, PickleNode):
                path = node.tensor.removesuffix("#pickle")
                findings.append(
                    Finding(
                        code="pickle",
                        severity="warning" if allow_pickle else "error",
                        message=f"{path}: a {node.type} is stored as a cloudpickle ({format_size(size.get(node.tensor, 0))});"
                        " loading it needs allow_pickle=True, which runs code from the file",
                        paths=[path],
                        type=node.type,
                        size_bytes=size.get(node.tensor),
                    )
                )
    for hz in manifest.hazards:
        findings.append(Finding(code=hz.code, severity=hz.severity, message=hz.message, paths=list(hz.paths)))
    for name, root in manifest.data.items():
        for path, node in iter_paths(root, name):
            if isinstance(node, ScheduleNode) and node.schedule == "piecewise_linear":
                findings.append(
                    Finding(
                        code="schedule",
                        severity="info",
                        message=f"{path}: the schedule function {node.source} is stored as {len(node.knots)} knots of a"
                        f" piecewise-linear function that reproduced it at {node.checked_points} progress values"
                        f" (largest deviation {node.max_error:g}); no code is stored",
                        paths=[path],
                        type=node.source,
                    )
                )
    return findings


def _decision_findings(manifest: Manifest, trust: TrustList, algo: type | None) -> list[Finding]:
    """Every refusal ``load`` decides from the header and manifest (``decide``, load's own phase 2), as findings.

    A policy file (``save_policy``) is refused by ``load`` (a warning: it is meant for ``load_policy``), and
    checked as ``load_policy`` reads it. Pickles are left to ``_findings``, which reports each one.
    """
    from sb3_safe_save._persist import Decision, decide
    from sb3_safe_save._policy import policy_view

    decisions = decide(manifest, algo, trust, allow_pickle=True)
    if manifest.content == "policy":
        try:
            view = policy_view(manifest)
        except SafeSaveError as e:
            decisions.append(Decision(e, "malformed", paths=("policy",)))
        else:
            decisions += decide(view, None, trust, policy=True, allow_pickle=True)
    findings: list[Finding] = []
    for d in decisions:
        message = d.message or str(d.error)
        if d.code == "untrusted_reference":
            where = list(d.paths)
            message = (
                f"{d.type} (used by {', '.join(where[:3])}) is not trusted;"
                f" load needs trusted=[{_trust_fix(d.type or '')}] (or safe_save_trusted on the algorithm class)"
            )
        code = cast(FindingCode, d.code)
        findings.append(Finding(code=code, severity=d.severity, message=message, paths=list(d.paths), key=d.key, type=d.type))
    return findings


def _reference_findings(manifest: Manifest, trust: TrustList, algo: type | None) -> list[Finding]:
    """What ``load`` decides about the file (``_decision_findings``), then about references it would import."""
    from sb3_safe_save._persist import references

    findings = _decision_findings(manifest, trust, algo)
    decided = {f.type for f in findings if f.code in ("untrusted_reference", "refused_reference")}
    refs, _ = references(manifest)
    for ref, uses in sorted(refs.items()):
        if ref not in decided and trust.why(ref, uses[0][1]) != "default":  # load imports it: decide as load does
            for path, kind in uses:
                try:
                    trust.resolve(ref, path, kind)
                except SafeSaveError as e:
                    reason = str(e).partition(": ")[2] or str(e)
                    findings.append(
                        Finding(
                            code="refused_reference",
                            severity="error",
                            message=f"{ref} (used by {path}) is refused by load: {reason}",
                            paths=[path],
                            type=ref,
                        )
                    )
                    break
    for ph in manifest.placeholders:
        if ph.spec is None or ph.spec.factory is None:
            continue
        ref = ph.spec.factory
        called = trust.why(ref, "factory") is not None
        findings.append(
            Finding(
                code="spec_factory",
                severity="info" if called else "warning",
                message=f"placeholder {ph.key!r} names the factory {ref}"
                + (
                    f"; load calls it as {ref}(**{dict(ph.spec.kwargs)!r:.200}) unless resources= supplies the object"
                    if called
                    else f"; load never calls it unless trusted exactly (trusted=[{ref!r}]);"
                    f" else pass resources={{{ph.key!r}: ...}}"
                ),
                paths=list(ph.paths),
                key=ph.key,
                type=ref,
            )
        )
    return findings


def _trust_fix(ref: str) -> str:
    """What ``trusted=[...]`` takes for ``ref``: the class object itself for one defined in a function."""
    return ref.rpartition(".")[2] + " (the class object: it is defined inside a function)" if LOCALS in ref else repr(ref)


# ============================================================================================ render
_COLORS = {"error": "31", "warning": "33", "info": "36", "ok": "32", "fail": "31", "bold": "1", "dim": "2"}


def _paint(text: str, style: str, color: bool) -> str:
    return f"\x1b[{_COLORS[style]}m{text}\x1b[0m" if color else text


def table(headers: list[str], rows: list[list[str]], *, right: Collection[int] = (), indent: str = "  ") -> list[str]:
    """Aligned plain-text table lines (column ``i`` right-aligned if ``i in right``)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return (indent + "  ".join(out)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _short_paths(paths: list[str], n: int = 2) -> str:
    return ", ".join(paths[:n]) + (f" (+{len(paths) - n})" if len(paths) > n else "")


def render_text(report: AuditReport, *, color: bool = False) -> str:
    """The report as aligned text tables; ANSI colours only if ``color``."""
    verdict = _paint("OK", "ok", color) if report.ok else _paint("FAIL", "fail", color)
    budget = "no budget" if report.max_bytes is None else f"budget {format_size(report.max_bytes)}"
    if report.over_budget:
        budget = _paint(budget + ", exceeded", "error", color)
    lines = [
        f"{_paint(report.source, 'bold', color)}  {verdict}",
        f"  algorithm {report.algorithm}, format {report.format_version}",
        f"  total {format_size(report.total_bytes)} ({report.total_bytes} bytes; {budget})"
        + (f"; {format_size(report.kept_out_bytes)} kept out in placeholders" if report.kept_out_bytes else ""),
        "",
        "Components",
    ]
    total = report.total_bytes or 1
    rows = [[c.name, c.kind, str(c.tensors), format_size(c.bytes), f"{100 * c.bytes / total:.1f}%"] for c in report.components]
    lines += table(["component", "kind", "tensors", "size", "share"], rows, right={2, 3, 4})
    if report.largest_tensors:
        lines += ["", "Largest tensors"]
        rows = [[t.name, t.dtype, "x".join(map(str, t.shape)) or "()", format_size(t.bytes)] for t in report.largest_tensors]
        lines += table(["tensor", "dtype", "shape", "size"], rows, right={3})
    if report.largest_attributes:
        lines += ["", "Largest attributes"]
        rows = [[a.name, a.kind, format_size(a.bytes)] for a in report.largest_attributes]
        lines += table(["attribute", "kind", "size"], rows, right={2})
    lines += ["", "Findings" if report.findings else "Findings: none"]
    if report.findings:
        rows = [[f.severity, f.code, _short_paths(f.paths) or "-", f.message] for f in report.findings]
        for i, line in enumerate(table(["severity", "code", "paths", "detail"], rows)):
            if i >= 2 and color:
                sev = report.findings[i - 2].severity
                line = line.replace(sev, _paint(sev, sev, color), 1)
            lines.append(line)
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: AuditReport) -> str:
    """GitHub-flavoured markdown: a heading with the verdict, components, findings, details folded."""
    icon = "✅" if report.ok else "❌"
    budget = "no budget" if report.max_bytes is None else f"budget {format_size(report.max_bytes)}"
    out = [
        f"### {icon} `{_md_escape(report.source)}`: {format_size(report.total_bytes)} ({budget})",
        "",
        f"`{report.algorithm}`, format {report.format_version}"
        + (f", {format_size(report.kept_out_bytes)} kept out in placeholders" if report.kept_out_bytes else ""),
        "",
        "| component | kind | tensors | size |",
        "|---|---|---:|---:|",
        *(f"| `{_md_escape(c.name)}` | {c.kind} | {c.tensors} | {format_size(c.bytes)} |" for c in report.components),
        "",
    ]
    if report.findings:
        out += ["| severity | code | paths | detail |", "|---|---|---|---|"]
        out += [
            f"| {f.severity} | `{f.code}` | {_md_escape(_short_paths(f.paths)) or '-'} | {_md_escape(f.message)} |"
            for f in report.findings
        ]
    else:
        out.append("No findings.")
    if report.largest_tensors:
        out += [
            "",
            "<details><summary>Largest tensors</summary>",
            "",
            "| tensor | dtype | shape | size |",
            "|---|---|---|---:|",
        ]
        out += [
            f"| `{_md_escape(t.name)}` | {t.dtype} | {'x'.join(map(str, t.shape)) or '()'} | {format_size(t.bytes)} |"
            for t in report.largest_tensors
        ]
        out += ["", "</details>"]
    return "\n".join(out) + "\n"


def reports_json(reports: Iterable[AuditReport], errors: Mapping[str, str] | None = None) -> str:
    """The CLI's JSON document: ``{"schema_version": 1, "ok": bool, "reports": [...], "errors": [...]}``."""
    items = list(reports)
    errs = [{"source": k, "error": v} for k, v in (errors or {}).items()]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "ok": all(r.ok for r in items) and not errs,
        "reports": [r.model_dump(mode="json") for r in items],
        "errors": errs,
    }
    return json.dumps(doc, indent=2)
