"""Hostile stock SB3 files (issue 25): the safe reader of stock zips and pickles runs, imports and writes nothing.

Each attack starts from a real stock PPO zip (or SB3's VecNormalize / replay-buffer pickle) and replaces one
pickle, one ``.pth`` member or the zip's layout, as an attacker would. Outcomes, as in the other tests here:
only a ``SafeSaveError``; no marker file; no canary module imported; nothing process-wide changed
(``_attack.refused``); ``sb3-safe-save audit`` calls none of these files accepted.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from _attack import Canary, refused
from sb3_safe_save import FormatError, SafeSaveError, load_vecnormalize, safe
from sb3_safe_save._cli import main
from sb3_safe_save._stock import MAX_RATIO, audit_stock, read_stock


# ------------------------------------------------------------------------------------------ pickles
def _args(*args: Any) -> bytes:
    """The opcodes that push ``args`` as one tuple (strings, lists, numbers only)."""
    return pickle.dumps(args, protocol=2)[2:-1]


def reduce_global(module: str, name: str, *args: Any) -> bytes:
    """``module.name(*args)`` through GLOBAL and REDUCE (what ``__reduce__`` to a function writes)."""
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + _args(*args) + b"R."


def _uni(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def reduce_stack_global(module: str, name: str, *args: Any) -> bytes:
    """The same through STACK_GLOBAL, whose name may be dotted (an attribute chain)."""
    return b"\x80\x04" + _uni(module) + _uni(name) + b"\x93" + _args(*args) + b"R."


def getattr_chain(command: str) -> bytes:
    """``getattr(__import__("os"), "system")(command)``: every step a call the file names."""
    imp = b"cbuiltins\n__import__\n" + _args("os") + b"R"
    get = b"cbuiltins\ngetattr\n(" + imp + _uni("system") + b"tR"
    return b"\x80\x04" + get + _args(command) + b"R."


def numpy_getattr(command: str) -> bytes:
    """A trusted-looking module reached through ``getattr`` on a numpy helper's globals."""
    helper = b"cnumpy.core.multiarray\n_reconstruct\n"
    get = b"cbuiltins\ngetattr\n(" + helper + _uni("__globals__") + b"tR"
    return b"\x80\x04" + get + _args(command) + b"R."


def code_object(command: str) -> bytes:
    """A cloudpickled function: cloudpickle's _make_function, _builtin_type('CodeType'), a code object."""
    return cloudpickle.dumps(lambda *_: os.system(command))


def legacy_torch_payload(command: str) -> bytes:
    """A torch legacy payload (what ``torch.storage._load_from_bytes`` reads) whose main pickle runs a command."""
    header = pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({"little_endian": True}, 2)
    return header + reduce_global("os", "system", command) + pickle.dumps([], 2)


def nested_storage(command: str) -> bytes:
    """``_rebuild_tensor_v2(_load_from_bytes(<payload>), ...)``: a nested payload must pass the same restriction."""
    inner = b"ctorch.storage\n_load_from_bytes\n" + _args(legacy_torch_payload(command)) + b"R"
    return b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + inner + b"K\x00K\x01\x85K\x01\x85\x89Ntq\x00R."


def canary_object(canary: Canary) -> bytes:
    """An object of the canary's class, built with NEWOBJ and given a state (its import writes the marker)."""
    return b"\x80\x02c" + f"{canary.module}\nThing\n".encode() + b")\x81}X\x01\x00\x00\x00xK\x01sb."


# --------------------------------------------------------------------------------------------- zips
@pytest.fixture(scope="module")
def stock_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("stock") / "ppo.zip"
    PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16, policy_kwargs={"net_arch": [8]}).save(path)
    return path.read_bytes()


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _zip(members: list[tuple[str, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compress) as zf:
        for name, raw in members:
            zf.writestr(name, raw)
    return out.getvalue()


def with_pickle(data: bytes, key: str, blob: bytes) -> bytes:
    members = _members(data)
    doc = json.loads(members["data"])
    doc[key] = {":type:": "<class 'object'>", ":serialized:": base64.b64encode(blob).decode()}
    members["data"] = json.dumps(doc).encode()
    return _zip(list(members.items()))


def torch_zip(data_pkl: bytes) -> bytes:
    return _zip([("archive/data.pkl", data_pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n")])


def with_member(data: bytes, name: str, raw: bytes, *, replace: bool = True) -> bytes:
    members = list(_members(data).items())
    if replace:
        members = [(n, r) for n, r in members if n != name]
    with pytest.warns(UserWarning, match="Duplicate name") if not replace else _nothing():
        return _zip([*members, (name, raw)])


class _nothing:  # a no-op context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


Attack = Callable[[bytes, str, Canary], bytes]
ATTACKS: dict[str, Attack] = {
    "os.system": lambda z, cmd, c: with_pickle(z, "policy_kwargs", reduce_global("os", "system", cmd)),
    "subprocess.Popen": lambda z, cmd, c: with_pickle(
        z, "observation_space", reduce_global("subprocess", "Popen", ["sh", "-c", cmd])
    ),
    "builtins.eval": lambda z, cmd, c: with_pickle(
        z, "policy_class", reduce_global("builtins", "eval", f"__import__('os').system({cmd!r})")
    ),
    "builtins.exec": lambda z, cmd, c: with_pickle(
        z, "_last_obs", reduce_global("builtins", "exec", f"import os; os.system({cmd!r})")
    ),
    "getattr-chain": lambda z, cmd, c: with_pickle(z, "policy_kwargs", getattr_chain(cmd)),
    "numpy-getattr": lambda z, cmd, c: with_pickle(z, "action_space", numpy_getattr(cmd)),
    "dotted-stack-global": lambda z, cmd, c: with_pickle(
        z, "policy_kwargs", reduce_stack_global("stable_baselines3.common.utils", "th.os.system", cmd)
    ),
    "dotted-helper": lambda z, cmd, c: with_pickle(
        z, "policy_kwargs", reduce_stack_global("collections", "OrderedDict.__init__.__globals__", cmd)
    ),
    "code-object": lambda z, cmd, c: with_pickle(z, "policy_kwargs", code_object(cmd)),
    "nested-storage": lambda z, cmd, c: with_pickle(z, "policy_kwargs", nested_storage(cmd)),
    "canary-class": lambda z, cmd, c: with_pickle(z, "action_noise", canary_object(c)),
    "pth-reduce": lambda z, cmd, c: with_member(z, "policy.pth", torch_zip(reduce_global("os", "system", cmd))),
    "pth-nested-storage": lambda z, cmd, c: with_member(z, "policy.pth", torch_zip(nested_storage(cmd))),
    "pth-legacy": lambda z, cmd, c: with_member(z, "policy.pth", legacy_torch_payload(cmd)),
    "zip-bomb": lambda z, cmd, c: _zip([*_members(z).items(), ("bomb.txt", b"\0" * (MAX_RATIO * 4096 * 2))], 8),
    "path-traversal": lambda z, cmd, c: with_member(z, "../../policy.pth", _members(z)["policy.pth"]),
    "absolute-name": lambda z, cmd, c: with_member(z, "/tmp/x.pth", _members(z)["policy.pth"]),
    "duplicate-member": lambda z, cmd, c: with_member(z, "data", _members(z)["data"], replace=False),
    "duplicate-torch-member": lambda z, cmd, c: with_member(
        z, "policy.pth", _zip([*_members(_members(z)["policy.pth"]).items(), ("archive/data/0", b"\0" * 4)])
    ),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_stock_zip_is_refused(
    attack: str, stock_zip: bytes, tmp_path: Path, canary: Canary, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    with pytest.MonkeyPatch.context():
        path = tmp_path / "hostile.zip"
        if attack.startswith("duplicate-torch"):
            with pytest.warns(UserWarning, match="Duplicate name"):
                path.write_bytes(ATTACKS[attack](stock_zip, f"touch {marker}", canary))
        else:
            path.write_bytes(ATTACKS[attack](stock_zip, f"touch {marker}", canary))
    refused(lambda: read_stock(path), canary, markers=(marker,))
    refused(lambda: safe(PPO).load(path, stock=True), canary, markers=(marker,))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), str(out)]) == 2
    assert not out.exists() and not marker.exists()
    assert main(["audit", str(path)]) in (1, 2)  # refused (1) or unreadable (2): never accepted
    capsys.readouterr()
    canary.assert_untouched()
    assert victim.read_text() == "precious\n"
    if attack in ("os.system", "getattr-chain", "code-object"):
        report = audit_stock(path)
        assert not report.accepted and report.refusal is not None


def test_refusal_names_what_the_pickle_would_import(stock_zip: bytes, tmp_path: Path) -> None:
    path = tmp_path / "hostile.zip"
    path.write_bytes(with_pickle(stock_zip, "policy_kwargs", reduce_global("os", "system", "true")))
    error = refused(lambda: read_stock(path))
    assert "os:system  (used at policy_kwargs; the pickle calls it)" in str(error)
    report = audit_stock(path)
    assert any(s.where == "data.policy_kwargs" and s.globals == ["os:system"] for s in report.pickles)


def test_code_in_a_schedule_is_never_run(stock_zip: bytes, tmp_path: Path) -> None:
    """A pickled function where SB3 keeps a schedule: not built, not run, even when training asks for it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.zip"
    path.write_bytes(with_pickle(stock_zip, "clip_range", code_object(f"touch {marker}")))
    model = safe(PPO).load(path, stock=True)
    with pytest.raises(SafeSaveError, match="clip_range was a pickled function"):
        model.clip_range(1.0)
    assert not marker.exists()


def test_hostile_vecnormalize_and_buffer_pickles(tmp_path: Path, canary: Canary) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(reduce_global("os", "system", f"touch {marker}"))
    env = DummyVecEnv([lambda: gym.make("Pendulum-v1")])
    refused(lambda: load_vecnormalize(evil, env), canary, markers=(marker,))
    model = safe(DQN)("MlpPolicy", "CartPole-v1", buffer_size=50, policy_kwargs={"net_arch": [8]})
    refused(lambda: model.load_replay_buffer(evil), canary, markers=(marker,))
    vn = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    vn.save(str(tmp_path / "vn.pkl"))
    raw = (tmp_path / "vn.pkl").read_bytes()
    forged = raw.replace(b"RunningMeanStd", canary.module.encode()[:14].ljust(14, b"x"))
    (tmp_path / "forged.pkl").write_bytes(forged)
    refused(lambda: load_vecnormalize(tmp_path / "forged.pkl", env), canary, markers=(marker,))


def test_huge_declared_shapes_are_refused(stock_zip: bytes, tmp_path: Path) -> None:
    """An array or a tensor whose shape does not fit its bytes is refused before anything is allocated."""
    arr = np.zeros(4, dtype=np.float32)
    blob = pickle.dumps(arr, protocol=5).replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85")
    path = tmp_path / "hostile.zip"
    path.write_bytes(with_pickle(stock_zip, "_last_obs", blob))
    error = refused(lambda: read_stock(path))
    assert isinstance(error, FormatError)
    state = {"w": th.zeros(4)}
    buf = io.BytesIO()
    th.save(state, buf)
    inner = _members(buf.getvalue())
    pkl_name = next(n for n in inner if n.endswith("data.pkl"))
    inner[pkl_name] = inner[pkl_name].replace(b"K\x04\x85", b"J\x00\x00\x00\x40\x85")
    path.write_bytes(with_member(stock_zip, "policy.pth", _zip(list(inner.items()))))
    assert isinstance(refused(lambda: read_stock(path)), FormatError)


def test_state_dicts_of_other_names_are_refused(stock_zip: bytes, tmp_path: Path) -> None:
    """A ``.pth`` member named after another attribute: set_parameters would call its load_state_dict."""
    path = tmp_path / "hostile.zip"
    path.write_bytes(with_member(stock_zip, "policy.features_extractor.pth", _members(stock_zip)["policy.pth"]))
    error = refused(lambda: safe(PPO).load(path, stock=True))
    assert "state dicts ['policy.features_extractor']" in str(error)
