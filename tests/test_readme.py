"""Every ```python block of README.md and docs/*.md runs as written, so the docs cannot drift from the code (issues 11, 24).

Each block runs in a fresh namespace, in a temporary working directory. A ```console block marked
``continue`` runs too: each ``$ sb3-safe-save ...`` line through the command's ``main``, which must
return 0. An HTML comment right before a block (invisible on GitHub) says how, with these words,
separated by commas:

* ``continue``: run in the namespace and directory of the block before (a continuation);
* ``subprocess``: run in a fresh Python process (e.g. a block that says "in a fresh process");
* ``pytest``: after running the block, call every ``test_*`` function it defines;
* ``s3``: start a moto S3 server on loopback with a bucket ``my-bucket``; the block's endpoint
  ``127.0.0.1:9000`` is replaced by the server's address;
* ``setup`` then code up to the end of the comment: code that gives the context the text around the block
  describes (e.g. "``env`` is a CartPole env"), run first;
* ``skip: <reason>``: not run (the reason says why, and where it is tested instead); the other blocks
  of its chain still run.

Training is capped at ``MAX_STEPS`` timesteps per ``learn`` call (``_setup_learn``, where SB3 reads
``total_timesteps``), so ``model.learn(10_000)`` runs as written in a fraction of the time.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_safe_save._cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the pages whose blocks run: the README, then the documentation site's pages
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_STEPS = 256
_BLOCK = re.compile(
    r"(?:<!--\s*readme-test:(?P<marks>.*?)-->\s*\n)?^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE
)
_HEADING = re.compile(r"^#+ (.+)$", re.MULTILINE)


@dataclass
class Block:
    line: int
    lang: str
    code: str
    marks: dict[str, str] = field(default_factory=dict)
    page: Path = README


@dataclass
class Chain:
    """A block and its continuations: one test."""

    name: str
    blocks: list[Block]


def _marks(text: str | None, page: str = "README.md") -> dict[str, str]:
    if not text:
        return {}
    # "setup" and "skip" take the text up to the next of them (or the end of the comment)
    words, *parts = re.split(r"(?:^|\s|,)(setup|skip)\b:?", text)
    marks = {name: value.strip() for name, value in zip(parts[::2], parts[1::2], strict=True)}
    for word in words.replace(",", " ").split():
        if word not in ("continue", "subprocess", "pytest", "s3"):
            raise ValueError(f"{page}: unknown readme-test mark {word!r}")
        marks[word] = ""
    return marks


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def readme_chains(page: Path = README) -> list[Chain]:
    """The chains of ``page``: a block and its ``continue`` blocks, named ``<page>:L<line>-<heading>``."""
    text = page.read_text()
    name = page_name(page)
    chains: list[Chain] = []
    for m in _BLOCK.finditer(text):
        if not (m["lang"] == "python" or (m["lang"] == "console" and m["marks"])):
            continue
        line = text.count("\n", 0, m.start("code")) + 1
        block = Block(line, m["lang"], m["code"], _marks(m["marks"], name), page)
        if "continue" in block.marks:
            assert chains, f"{name} line {line}: 'continue' needs a block before it"
            chains[-1].blocks.append(block)
            continue
        headings = _HEADING.findall(text, 0, m.start())
        slug = re.sub(r"\W+", "-", headings[-1].lower()).strip("-") if headings else "top"
        chains.append(Chain(f"{name}:L{line}-{slug}", [block]))
    return chains


CHAINS = [chain for page in PAGES for chain in readme_chains(page)]


def test_the_readme_has_python_blocks() -> None:
    assert len(readme_chains(README)) >= 3  # the parser still finds them (the front page has three chains)
    assert len(CHAINS) >= 13  # README and docs pages together


def test_the_docs_pages_have_python_blocks() -> None:
    pages = {chain.blocks[0].page.name for chain in CHAINS}
    assert {"saving-and-loading.md", "hub.md", "resume.md", "remote.md", "vecnormalize.md"} <= pages


@pytest.fixture
def capped_training(monkeypatch: pytest.MonkeyPatch) -> None:
    setup_learn = BaseAlgorithm._setup_learn

    def capped(self: BaseAlgorithm, total_timesteps: int, *args: Any, **kwargs: Any) -> Any:
        return setup_learn(self, min(total_timesteps, MAX_STEPS), *args, **kwargs)

    monkeypatch.setattr(BaseAlgorithm, "_setup_learn", capped)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on loopback with the bucket ``my-bucket``; yields ``host:port``."""
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})  # the block sets it; restored afterwards
    fs = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=f"http://{host}:{port}")
    fs.mkdir("my-bucket")
    try:
        yield f"{host}:{port}"
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        server.stop()


@pytest.mark.parametrize("chain", CHAINS, ids=[c.name for c in CHAINS])
def test_readme_block_runs_as_written(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capped_training: None, request: pytest.FixtureRequest
) -> None:
    if all("skip" in b.marks for b in chain.blocks):
        pytest.skip(chain.blocks[0].marks["skip"])
    monkeypatch.chdir(tmp_path)
    endpoint = request.getfixturevalue("s3_server") if any("s3" in b.marks for b in chain.blocks) else None
    namespace: dict[str, Any] = {"__name__": "readme"}
    for block in chain.blocks:
        if "skip" in block.marks:  # the blocks before it still run
            continue
        code = block.code if endpoint is None else block.code.replace("127.0.0.1:9000", endpoint)
        where = f"{page_name(block.page)}, block at line {block.line}"
        if block.lang == "console":
            _run_commands(code, where)
            continue
        if "subprocess" in block.marks:
            _run_in_subprocess(block.marks.get("setup", ""), code, where)
            continue
        if "setup" in block.marks:
            exec(compile(block.marks["setup"], f"{where} (setup)", "exec"), namespace)
        # pad with blank lines so tracebacks point at the page's own line numbers
        exec(compile("\n" * (block.line - 1) + code, str(block.page), "exec"), namespace)
        if "pytest" in block.marks:
            tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
            assert tests, f"{where}: marked 'pytest' but defines no test_* function"
            for fn in tests:
                fn()


def _run_commands(code: str, where: str) -> None:
    commands = [shlex.split(line[2:], comments=True) for line in code.splitlines() if line.startswith("$ ")]
    assert commands, f"{where}: a console block without '$ ' lines"
    for argv in commands:
        assert argv[0] == "sb3-safe-save", f"{where}: only sb3-safe-save commands run here, not {argv[0]!r}"
        assert cli_main(argv[1:]) == 0, f"{where}: {' '.join(argv)} failed"


def _run_in_subprocess(setup: str, code: str, where: str) -> None:
    paths = [str(ROOT / "src"), str(ROOT / "examples"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    result = subprocess.run(
        [sys.executable, "-c", f"{setup}\n{code}"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{where} failed in a fresh process:\n{result.stdout}\n{result.stderr}"
