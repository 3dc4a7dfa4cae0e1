"""Bounded cost (issue 10, point 7) and every failure a ``SafeSaveError`` (point 8), CLI included.

The costly attacks run in a fresh interpreter (``run_isolated``): a regex that backtracks forever or a
multi-GB allocation must not take pytest down with it, and a subprocess's ``ru_maxrss`` measures the
peak. The bounds are generous (tens of seconds, hundreds of MB): the fixed loader needs milliseconds
and megabytes for these files, the broken one minutes or gigabytes.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from stable_baselines3 import PPO

from _attack import base, forge, manifest, placeholder, refused, run_cli, run_isolated, with_placeholder, write
from _hostile import tiny_kwargs
from sb3_safe_save import audit, load_vecnormalize, read_manifest, safe
from sb3_safe_save._manifest import META_CHECKSUM, META_MANIFEST
from sb3_safe_save._weights import checksum

SECONDS = 20.0  # per hostile call; the loader needs well under 1 s for each of these files
EXTRA_MB = 400.0  # peak memory a hostile call may add to an interpreter that has loaded a model once

BACKTRACK = "a" + "[0]" * 43 + "-"  # 131 bytes: [0] matches two alternatives of the path pattern


def _huge_box(m: dict[str, Any]) -> None:  # ~220 bytes of JSON; 8192 x 8192 float64 bounds = 1.2 GB as arrays
    m["data"]["extra_space"] = {
        "kind": "space",
        "space": "Box",
        "args": {
            "low": -1.0,
            "high": 1.0,
            "shape": {"kind": "tuple", "items": [8192, 8192]},
            "dtype": {"kind": "np_dtype", "value": "<f8"},
        },
    }


def _many_bad_nodes(m: dict[str, Any]) -> None:  # ~1.6 MB of nodes that each fail validation
    m["data"]["extra"] = {"kind": "list", "items": [{"kind": "bogus"}] * 95_000}


COSTLY = {
    "backtracking placeholder path": lambda m: m["placeholders"].append(placeholder("x", [BACKTRACK], optional=True)),
    "backtracking state-dict name": lambda m: m["state_dicts"][0].update(name=BACKTRACK),
    "backtracking data key": lambda m: m["data"].update({BACKTRACK: 1}),
    "1.6 MB of invalid nodes": _many_bad_nodes,
    "a 220-byte Box node of 1.2 GB": _huge_box,
    "Box nodes in a tuple space": lambda m: m["data"].update(
        extra_space={
            "kind": "space",
            "space": "Tuple",
            "args": {"spaces": {"kind": "tuple", "items": [manifest(base())["data"]["observation_space"]] * 2000}},
        }
    ),
    "deque with a huge maxlen and many items": lambda m: m["data"].update(
        ep_info_buffer={"kind": "deque", "maxlen": 1_000_000, "items": [{"kind": "dict", "items": {"r": 1.0}}] * 200_000}
    ),
}
CALLS = {  # read_manifest shares audit's parsing path
    "load": "safe(PPO).load(path)",
    "audit": "audit(path, fail_on='warning')",
}


@pytest.mark.slow
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("attack", list(COSTLY))
def test_cost_is_bounded(tmp_path: Path, attack: str, call: str) -> None:
    path = write(tmp_path, forge(base(), COSTLY[attack]))
    out = run_isolated(path, CALLS[call], timeout=90)
    assert out.seconds < SECONDS, f"{call} took {out.seconds:.1f} s"
    assert out.extra_rss_mb < EXTRA_MB, f"{call} added {out.extra_rss_mb:.0f} MB of peak memory"
    if out.error is not None:
        assert out.safe_error, f"{call} raised {out.error}, not a SafeSaveError"
    else:
        assert call != "load" or attack in VALID_BUT_LARGE, f"load accepted the file ({attack})"


#: Valid agents, only large: a load may accept them, within the bounds above.
VALID_BUT_LARGE = {"Box nodes in a tuple space", "deque with a huge maxlen and many items"}


# ----------------------------------------------------------------------------------------- errors
def _surrogate_in_manifest(data: bytes) -> bytes:
    def edit(m: dict[str, Any]) -> None:
        m["data"]["policy_kwargs"]["items"]["\udc80x"] = 1
        m["placeholders"].append(placeholder("k\ud800", ["expert"], optional=True))

    return forge(data, edit)


def _raw_header(data: bytes, change: Any) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()  # ensure_ascii: a lone surrogate travels as \udc80
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _surrogate_tensor_name(data: bytes) -> bytes:
    def change(h: dict[str, Any]) -> None:
        key = next(k for k in h if k != "__metadata__")
        h[key + "\udc80"] = h.pop(key)

    return _raw_header(data, change)


def _surrogate_metadata(data: bytes) -> bytes:
    def change(h: dict[str, Any]) -> None:
        h["__metadata__"]["\udc80"] = "\ud800"
        text = h["__metadata__"][META_MANIFEST].replace('"gamma": 0.99', '"gamma": 0.99, "x\\udc80": 1')
        h["__metadata__"][META_MANIFEST] = text
        h["__metadata__"][META_CHECKSUM] = checksum(text.encode("utf-8", "surrogatepass"))

    return _raw_header(data, change)


SURROGATES = {"manifest": _surrogate_in_manifest, "tensor name": _surrogate_tensor_name, "metadata": _surrogate_metadata}


@pytest.mark.parametrize("where", list(SURROGATES))
def test_lone_surrogates_are_safe_save_errors(tmp_path: Path, where: str) -> None:
    path = write(tmp_path, SURROGATES[where](base()))
    refused(lambda: safe(PPO).load(path))
    refused(lambda: read_manifest(path))
    refused(lambda: audit(path))
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **tiny_kwargs("PPO"))  # built outside: building seeds the RNGs
    refused(lambda: model.set_parameters(path))


URLS = ["nosuchproto://bucket/agent.safetensors", "zz9://x", "blockcache::nosuchproto://x/y"]


@pytest.mark.parametrize("url", URLS)
def test_unknown_url_protocols_are_safe_save_errors(url: str) -> None:
    model = safe(PPO)("MlpPolicy", "CartPole-v1", **tiny_kwargs("PPO"))
    refused(lambda: safe(PPO).load(url))
    refused(lambda: read_manifest(url))
    refused(lambda: audit(url))
    refused(lambda: model.set_parameters(url))
    refused(lambda: model.save(url))
    refused(lambda: load_vecnormalize(url, model.get_env()))


@pytest.mark.parametrize("kwargs", [{"bogus": 1}, {}, {"size": "many"}, {"size": -1, "extra": None}])
def test_wrong_factory_arguments_are_safe_save_errors(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    ref = "_attack:make_thing"  # a factory the caller trusts; the file gives it arguments it does not take

    def edit(m: dict[str, Any]) -> None:
        with_placeholder(m, "expert", placeholder("expert", ["expert"], spec={"factory": ref, "kwargs": kwargs}))

    path = write(tmp_path, forge(base(), edit))
    refused(lambda: safe(PPO).load(path, trusted=[ref]))


# ------------------------------------------------------------------------------------------- CLI
ESCAPES = "\u202e\x1b]0;owned\x07\x1b[2J\x1b[31m\x9b31m\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\\r\x08\x00"


def _escape_everywhere(m: dict[str, Any]) -> None:
    m["placeholders"].append(
        placeholder(
            "key" + ESCAPES,
            ["expert"],
            type="type" + ESCAPES,
            hint={"h" + ESCAPES: "v" + ESCAPES},
            optional=True,
            spec={"factory": "pkg.mod:fn", "kwargs": {"k" + ESCAPES: "v" + ESCAPES}},
        )
    )
    m["data"]["expert"] = {"kind": "placeholder", "key": "key" + ESCAPES}
    m["hazards"].append({"code": "shared_with_target", "severity": "warning", "message": "m" + ESCAPES, "paths": ["p"]})
    m["versions"]["torch"] = "2" + ESCAPES
    m["versions"]["stable_baselines3"] = ESCAPES
    m["data"]["policy_kwargs"]["items"]["k" + ESCAPES] = "v" + ESCAPES


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{path}"],
        ["inspect", "--format", "json", "{path}"],
        ["audit", "{path}"],
        ["audit", "{path}", "--format", "markdown"],
        ["audit", "{path}", "--format", "json"],
        ["audit", "{path}", "--fail-on", "warning"],
    ],
    ids=lambda a: " ".join(a),
)
def test_cli_escapes_text_from_the_file(tmp_path: Path, args: list[str]) -> None:
    path = write(tmp_path, forge(base(), _escape_everywhere))
    done = run_cli(*[a.replace("{path}", str(path)) for a in args], cwd=tmp_path)
    out = done.stdout + done.stderr
    assert "Traceback" not in out
    assert done.returncode in (0, 1, 2)
    found = sorted(set(_CONTROL.findall(out)))
    assert not found, f"control characters reached the terminal: {found!r}"
    if args[0] == "audit" and "--fail-on" in args:
        assert done.returncode != 0, "a file load refuses was called OK"


@pytest.mark.parametrize(
    "content", [b"", b"\x00" * 7, b"PK\x03\x04junk", b"\xff" * 64, b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}']
)
def test_cli_garbage_is_exit_2_without_traceback(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    for command in ("inspect", "audit"):
        done = run_cli(command, str(path), cwd=tmp_path)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr


def test_cli_export_of_a_hostile_file_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    def edit(m: dict[str, Any]) -> None:
        spec = {"factory": "stable_baselines3.ppo.ppo:th.os.system", "kwargs": {"command": f"touch {marker}"}}
        with_placeholder(m, "expert", placeholder("expert", ["expert"], spec=spec))

    path = write(tmp_path, forge(base(), edit))
    done = run_cli("export", str(path), str(tmp_path / "out.zip"), cwd=tmp_path)
    assert done.returncode in (0, 1, 2) and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not marker.exists(), "export ran the file's factory"
