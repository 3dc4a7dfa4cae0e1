"""``audit`` and ``assert_save_budget``: exact sizes, header-only file audits, findings and hazards built for real."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

import sb3_safe_save
from _naive import make_naive_model
from lang_dqn import CustomDQNPolicy, ModuleExpert, UnpicklableExpert, make_model
from sb3_safe_save import AuditReport, Finding, _file, _persist, _weights, assert_save_budget, audit, safe
from sb3_safe_save._audit import format_size, parse_size
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST, ArrayNode, TensorMeta


def _codes(report: AuditReport) -> dict[str, Finding]:
    return {f.code: f for f in report.findings}


@pytest.fixture(scope="module")
def trained_dqn() -> Any:
    model = safe(DQN)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, learning_starts=16, buffer_size=64, seed=0)
    model.learn(32)
    return model


# ------------------------------------------------------------------------------------------- sizes
def test_live_audit_predicts_the_exact_file_size(trained_dqn: Any, tmp_path: Path) -> None:
    live = audit(trained_dqn)
    path = tmp_path / "dqn.safetensors"
    trained_dqn.save(path)
    from_file = audit(path)
    assert live.total_bytes == path.stat().st_size == from_file.total_bytes
    assert live.header_bytes == from_file.header_bytes and live.manifest_bytes == from_file.manifest_bytes
    for report in (live, from_file):
        assert sum(c.bytes for c in report.components) == report.total_bytes
        names = {c.name: c.kind for c in report.components}
        assert names["policy"] == "state_dict" and names["policy.optimizer"] == "optimizer"
        assert names["header (manifest)"] == "header" and names["data arrays"] == "data"
        assert report.largest_tensors[0].bytes == max(t.bytes for t in report.largest_tensors)
        assert {a.name for a in report.largest_attributes} >= {"policy", "policy.optimizer"}
        assert report.ok and report.findings == []
    assert [c.model_dump() for c in live.components] == [c.model_dump() for c in from_file.components]
    assert live.source_kind == "model" and from_file.source_kind == "file" and from_file.source == str(path)


def test_live_audit_writes_nothing(trained_dqn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("audit must not write")

    monkeypatch.setattr(_weights, "write_atomic", refuse)
    monkeypatch.setattr(_weights, "write_stream", refuse)
    audit(trained_dqn, max_bytes="1 MB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (5, 5),
        ("5 MB", 5_000_000),
        ("5MB", 5_000_000),
        ("5MiB", 5 * 2**20),
        ("500KB", 500_000),
        ("500 kib", 500 * 1024),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("2G", 2 * 10**9),
        ("123", 123),
        ("10 B", 10),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "five MB", "5 XB", "-5", -1, True, "5 MB extra"])
def test_parse_size_refuses(bad: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(5 * 2**20) == "5.0 MiB"
    assert format_size(28 * 10**9) == "26.1 GiB"


def test_budget_verdict(trained_dqn: Any) -> None:
    small = audit(trained_dqn, max_bytes=100)
    assert not small.ok and small.over_budget and small.max_bytes == 100
    assert small.findings[0].code == "over_budget" and small.findings[0].severity == "error"
    assert not audit(trained_dqn, max_bytes=100, fail_on=None).ok  # the budget counts whatever fail_on says
    big = audit(trained_dqn, max_bytes="5 MB")
    assert big.ok and not big.over_budget and big.max_bytes == 5_000_000


# ------------------------------------------------------------------------------- header only (1 GB)
def _inflate(small: Path, out: Path, extra_bytes: int) -> None:
    """A valid file whose body is ``extra_bytes`` bigger: a real manifest plus one huge array, written sparse."""
    with open(small, "rb") as f:
        header, manifest = _persist._parse(f, small.stat().st_size)
        f.seek(header.body_start)
        body = f.read()
    n = extra_bytes // 4
    data = {**manifest.data, "big_buffer": ArrayNode(tensor="big_buffer", dtype="float32", shape=[n])}
    tensors = {**manifest.tensors, "big_buffer": TensorMeta(dtype="F32", shape=[n], xxh3="0" * 32)}
    text = manifest.model_copy(update={"data": data, "tensors": tensors}).model_dump_json()
    zero = np.zeros(1, dtype=np.uint8)
    infos = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    blobs = {k: _weights.Blob(np.broadcast_to(zero, (i.nbytes,)), i.dtype, i.shape) for k, i in infos}
    blobs["big_buffer"] = _weights.Blob(np.broadcast_to(zero, (n * 4,)), "F32", (n,))
    raw = _weights._header_bytes(blobs, {"format": "pt", META_MANIFEST: text, META_CHECKSUM: _weights.checksum(text.encode())})
    with open(out, "wb") as g:
        g.write(struct.pack("<Q", len(raw)))
        g.write(raw)
        g.write(body)
        g.truncate(8 + len(raw) + len(body) + n * 4)  # sparse: no disk used for the zeros


class _CountingFile:
    """Wraps a real file object and counts the bytes read through it."""

    def __init__(self, f: Any, counter: list[int]) -> None:
        self._f = f
        self._counter = counter

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self._counter[0] += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        got: int = self._f.readinto(buf)
        self._counter[0] += got
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_file_audit_reads_only_the_header_of_a_1gb_file(
    trained_dqn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small.safetensors"
    trained_dqn.save(small)
    big = tmp_path / "big.safetensors"
    _inflate(small, big, 2**30)
    try:
        assert big.stat().st_size > 2**30
        counter = [0]
        opened: list[str] = []

        def counting_open(file: Any, *args: Any, **kwargs: Any) -> _CountingFile:
            opened.append(os.fspath(file))
            return _CountingFile(open(file, *args, **kwargs), counter)

        monkeypatch.setattr(_file, "open", counting_open, raising=False)  # shadows the builtin inside _file only
        report = audit(big)
        monkeypatch.undo()
        assert opened == [str(big)]
        assert 0 < counter[0] < 2**20, counter[0]
        assert report.total_bytes == big.stat().st_size
        assert report.largest_tensors[0].name == "big_buffer" and report.largest_tensors[0].bytes == 2**30
        assert {c.name: c.bytes for c in report.components}["data arrays"] >= 2**30
        assert not audit(big, max_bytes="1 GiB").ok
        assert audit(big, max_bytes="2 GiB").ok
    finally:
        big.unlink()


# --------------------------------------------------------------------------------------- findings
def test_seven_billion_parameter_expert_on_meta_is_a_placeholder_with_its_size() -> None:
    expert = ModuleExpert(width=59161, depth=3, device="meta")  # 2 x 59161^2 + small = 7.0e9 parameters
    n_params = sum(p.numel() for p in expert.parameters())
    assert 6.9e9 < n_params < 7.1e9
    model = make_model(expert, net_arch=[8])
    report = audit(model, max_bytes="1 MB")
    placeholder = _codes(report)["placeholder"]
    assert placeholder.key == "vlm_model" and placeholder.type == "lang_dqn.ModuleExpert"
    assert placeholder.reason == "external" and placeholder.severity == "info"  # lang_dqn holds it through external()
    assert placeholder.size_bytes == 4 * n_params  # about 28 GB kept out
    assert "policy.q_net.vlm_model" in placeholder.paths and "policy_kwargs.vlm_model" in placeholder.paths
    assert report.kept_out_bytes == 4 * n_params
    assert not report.over_budget and report.total_bytes < 100_000


def test_core_scenario_shows_shared_with_target_and_external_in_optimizer() -> None:
    model = make_naive_model(ModuleExpert(), net_arch=[8])  # self.vlm_model = vlm_model: registered (warned at build)
    report = audit(model)
    codes = _codes(report)
    shared = codes["shared_with_target"]
    assert (
        shared.severity == "error"
        and "policy.q_net.vlm_model" in shared.paths
        and "policy.q_net_target.vlm_model" in shared.paths
    )
    assert codes["external_in_optimizer"].severity == "warning" and codes["external_in_optimizer"].paths == [
        "policy.optimizer"
    ]
    assert codes["placeholder"].size_bytes == sum(p.numel() * 4 for p in model.policy.q_net.vlm_model.parameters())
    assert not report.ok  # the error-level hazard
    assert audit(model, fail_on=None).ok
    assert [f.severity for f in report.findings] == sorted(
        (f.severity for f in report.findings), key=["error", "warning", "info"].index
    )
    # the hazard is real: the online and target networks hold the very same expert
    assert model.policy.q_net.vlm_model is model.policy.q_net_target.vlm_model


class PretrainedExtractor(BaseFeaturesExtractor):
    """A features extractor around a module that was trained elsewhere."""

    def __init__(self, observation_space: spaces.Box, pretrained: th.nn.Linear) -> None:
        super().__init__(observation_space, features_dim=pretrained.out_features)
        self.pretrained = pretrained

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return th.relu(self.pretrained(observations))


def test_pretrained_module_in_ortho_init_policy_is_reinitialised_on_build() -> None:
    pretrained = th.nn.Linear(4, 8)
    before = pretrained.weight.detach().clone()
    policy_kwargs = {
        "features_extractor_class": PretrainedExtractor,
        "features_extractor_kwargs": {"pretrained": pretrained},
        "net_arch": [8],
        "ortho_init": True,
    }
    model = PPO("MlpPolicy", "CartPole-v1", policy_kwargs=policy_kwargs, n_steps=16, batch_size=16)
    assert not th.equal(before, pretrained.weight)  # the hazard is real: building the policy overwrote it
    report = audit(model)
    hazard = _codes(report)["reinitialised_on_build"]
    assert hazard.severity == "error" and any(p.startswith("policy.features_extractor") for p in hazard.paths)
    assert not report.ok
    quiet = PPO("MlpPolicy", "CartPole-v1", policy_kwargs={**policy_kwargs, "ortho_init": False}, n_steps=16, batch_size=16)
    assert "reinitialised_on_build" not in _codes(audit(quiet))


class _Opaque:
    """No codec stores this; only a pickle can (its own ``__reduce__``: not stored field by field, even trusted)."""

    def __init__(self) -> None:
        self.payload = list(range(100))

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Opaque, ())


def test_pickled_values_are_errors_unless_allowed(tmp_path: Path) -> None:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, n_steps=16, batch_size=16)
    model.opaque = _Opaque()
    live = audit(model)
    pickle = _codes(live)["pickle"]
    assert pickle.severity == "error" and pickle.paths == ["opaque"] and pickle.size_bytes and not live.ok
    assert _codes(audit(model, allow_pickle=True))["pickle"].severity == "warning"
    path = tmp_path / "p.safetensors"
    model.save(path, allow_pickle=True)
    report = audit(path, allow_pickle=True)
    assert report.ok and report.total_bytes == live.total_bytes == path.stat().st_size
    assert {c.name: c.kind for c in report.components}["pickled values"] == "pickle"
    assert _codes(report)["pickle"].paths == ["opaque"]


def test_untrusted_references_are_warnings() -> None:
    # safe(DQN) trusts stable_baselines3 only, so a policy class from another module is untrusted
    model = safe(DQN)(CustomDQNPolicy, "CartPole-v1", policy_kwargs={"net_arch": [8]}, buffer_size=100)
    report = audit(model)
    untrusted = _codes(report)["untrusted_reference"]
    assert (
        untrusted.severity == "warning"
        and untrusted.type == "lang_dqn:CustomDQNPolicy"
        and untrusted.paths == ["policy_class"]
    )
    assert "untrusted_reference" not in _codes(audit(model, trusted=["lang_dqn.*"]))
    assert report.ok  # warnings only
    assert not audit(model, fail_on="warning").ok


def test_the_saving_class_module_is_trusted_as_load_would() -> None:
    # CustomDQN.load trusts lang_dqn (its own module), so the audit does not flag CustomDQNPolicy
    model = make_model(UnpicklableExpert(), net_arch=[8])
    report = audit(model)
    assert "untrusted_reference" not in _codes(report)
    placeholder = _codes(report)["placeholder"]
    assert placeholder.reason == "external" and placeholder.type == "lang_dqn.UnpicklableExpert"
    assert report.ok  # info only


def test_disallowed_placeholders_are_errors() -> None:
    model = make_model(UnpicklableExpert(), net_arch=[8])
    assert _codes(audit(model, allow_placeholders=False))["placeholder"].severity == "error"
    assert _codes(audit(model, allow_placeholders=["vlm_model"]))["placeholder"].severity == "info"
    assert _codes(audit(model, allow_placeholders=["other"]))["placeholder"].severity == "error"


# ----------------------------------------------------------------------------------- assert helper
def test_assert_save_budget(trained_dqn: Any) -> None:
    report = assert_save_budget(trained_dqn, "5 MB")
    assert report.ok
    with pytest.raises(AssertionError, match="over the budget") as info:
        assert_save_budget(trained_dqn, "1KB")
    assert "Components" in str(info.value) and "policy.optimizer" in str(info.value)


def test_assert_save_budget_placeholders_must_be_allowed() -> None:
    model = make_model(UnpicklableExpert(), net_arch=[8])
    with pytest.raises(AssertionError, match="placeholder 'vlm_model'"):
        assert_save_budget(model, "5 MB")
    assert_save_budget(model, "5 MB", allow_placeholders=["vlm_model"])


# ------------------------------------------------------------------------------------------- JSON
def test_json_is_stable(trained_dqn: Any) -> None:
    doc = json.loads(audit(trained_dqn, max_bytes=10).model_dump_json())
    assert doc["schema_version"] == 1
    assert set(doc) == {
        "schema_version", "source", "source_kind", "algorithm", "format_version", "total_bytes", "header_bytes",
        "manifest_bytes", "tensor_bytes", "kept_out_bytes", "max_bytes", "over_budget", "fail_on", "ok", "components",
        "largest_tensors", "largest_attributes", "findings",
    }  # fmt: skip
    assert set(doc["components"][0]) == {"name", "kind", "tensors", "bytes"}
    assert set(doc["largest_tensors"][0]) == {"name", "dtype", "shape", "bytes"}
    assert set(doc["findings"][0]) == {"code", "severity", "message", "paths", "key", "type", "reason", "size_bytes"}
    assert AuditReport.model_validate(doc) == audit(trained_dqn, max_bytes=10)


def test_renderings(trained_dqn: Any) -> None:
    report = audit(make_naive_model(ModuleExpert(), net_arch=[8]), max_bytes="5 MB")
    text = report.table()
    assert "\x1b[" not in text and "shared_with_target" in text and "Largest tensors" in text
    assert "\x1b[31m" in report.table(color=True)
    md = report.markdown()
    assert md.startswith("### ❌") and "| severity | code | paths | detail |" in md and "<details>" in md
    assert report.summary().startswith("FAIL: <live CustomDQN model>")
    assert audit(trained_dqn).summary().startswith("OK: ")
    assert sb3_safe_save.audit is audit
