"""The ``sb3-safe-save`` command (also ``python -m sb3_safe_save``).

Subcommands::

    sb3-safe-save inspect PATH                      manifest, versions, placeholders, tensors, SHA-256
    sb3-safe-save audit PATH... [--max-size 5MB]    sizes and findings; exit 1 when a check fails
    sb3-safe-save convert SB3_ZIP OUT [--trust REF]  a stock SB3 zip -> an sb3_safe_save file (pickles not run)
    sb3-safe-save export PATH OUT.zip               an sb3_safe_save file -> a stock SB3 zip

Reports go to stdout (or ``-o FILE``), summaries and errors to stderr. Colour only on a terminal,
and never when ``NO_COLOR`` is set.

Exit status: 0 all well; 1 a budget was exceeded or a finding is at or above ``--fail-on``; 2 a usage
error, or a file that cannot be read or is not valid. No traceback is ever printed: any error is one
``error:`` line (exit 2).

Text that comes from a file (keys, paths, messages, versions) is escaped before it is printed: a
control character, an ANSI/OSC escape sequence or a bidirectional override becomes ``\\x1b``,
``\\u202e``, ..., so a hostile file cannot drive the terminal. JSON output is ASCII (``\\u001b``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from sb3_safe_save._audit import AuditReport, audit, format_size, parse_size, reports_json, table
from sb3_safe_save._errors import SafeSaveError
from sb3_safe_save._trust import TrustList
from sb3_safe_save._version import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    """A problem with what was asked (exit 2), reported as one message."""


def clean(text: object) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\u202e``): safe to print on a terminal.

    :param text: any text, e.g. from a file
    :return: the same text if it is all printable, else an escaped copy (newlines included)
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else (f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")


def _clean_lines(text: object) -> str:
    """A multi-line message with each line escaped (its own line breaks kept)."""
    return "\n".join(clean(line) for line in str(text).split("\n"))


def _clean_tree(value: Any) -> Any:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean(k) if isinstance(k, str) else k: _clean_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_tree(v) for v in value]
    return value


def _clean_report(report: AuditReport) -> AuditReport:
    """The report with every string escaped, for the text and markdown renderers (JSON is escaped by json.dumps)."""
    return AuditReport.model_validate(_clean_tree(report.model_dump()))


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: IO[str] | None = None,
    line: str | None = None,
) -> None:
    print(f"sb3-safe-save: {category.__name__}: {_clean_lines(message)}", file=sys.stderr)


def _color(stream: IO[str]) -> bool:
    return (
        bool(getattr(stream, "isatty", lambda: False)())
        and not os.environ.get("NO_COLOR")
        and os.environ.get("TERM") != "dumb"
    )


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb3-safe-save",
        description="Inspect, audit and convert Stable-Baselines3 agents saved with sb3_safe_save.",
        epilog="exit status: 0 ok, 1 audit failed, 2 usage error or unreadable file",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="show a file's manifest, placeholders and tensors (reads the header, hashes the file)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    p.add_argument("--no-sha256", action="store_true", help="skip hashing the whole file")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("audit", help="sizes per component, largest tensors, findings; exit 1 when a check fails")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--max-size", type=_size_arg, default=None, metavar="SIZE", help="size budget, e.g. 5MB, 5MiB, 500KB")
    p.add_argument(
        "--fail-on",
        choices=["info", "warning", "error", "never"],
        default="error",
        help="fail on findings at or above this severity (default: error; never: budget only)",
    )
    p.add_argument("--format", choices=["text", "json", "markdown"], default="text", help="report format (default: text)")
    p.add_argument("-o", "--output", default="-", metavar="FILE", help="write the report to FILE ('-': stdout, the default)")
    p.add_argument("--no-placeholders", action="store_true", help="placeholders are errors, not info")
    p.add_argument("--allow-placeholder", action="append", default=[], metavar="KEY", help="with --no-placeholders: allow KEY")
    p.add_argument("--allow-pickle", action="store_true", help="pickled values are warnings, not errors")
    p.add_argument("--trust", action="append", default=[], metavar="REF", help="trust REF as load(trusted=[...]) would")
    p.add_argument(
        "--algo",
        default=None,
        metavar="ALGO",
        help="decide as ALGO.load would ('mypackage.module:MyAlgo': imports it; default: the file's SB3 base algorithm)",
    )
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("convert", help="import a stock SB3 zip (read without running its pickles)")
    p.add_argument("zip_path", metavar="SB3_ZIP")
    p.add_argument("out", metavar="OUT")
    p.add_argument(
        "--trust-pickle", action="store_true", help="I trust this file: unpickle it with SB3 (runs code from the file)"
    )
    p.add_argument(
        "--trust", action="append", default=[], metavar="REF", help="trust class REF ('pkg.mod:Name') in its pickles"
    )
    p.add_argument("--algo", default=None, help="algorithm class: DQN, PPO, ... or 'module:Class' (default: guessed)")
    p.add_argument("--allow-pickle", action="store_true", help="store values no codec handles as visible pickles")
    p.add_argument("--device", default="cpu", help="device to load on (default: cpu)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="write a stock SB3 zip (placeholders are left out and listed)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("out", metavar="OUT.zip")
    p.add_argument("--trust", action="append", default=[], metavar="REF", help="trust REF ('pkg.mod:Name', 'pkg.*') at load")
    p.add_argument("--allow-pickle", action="store_true", help="unpickle pickled values in the file (runs code)")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    :param argv: the arguments (default: ``sys.argv[1:]``)
    :return: 0 all well, 1 a check failed, 2 a usage error or an unreadable file
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # warnings may quote the file: escape them too
            return int(args.func(args))
    except BrokenPipeError:  # e.g. piped into head: stop quietly (Python's documented recipe)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAIL
    except (SafeSaveError, OSError, _UsageError) as e:
        print(f"sb3-safe-save {args.command}: error: {_clean_lines(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # never a traceback: whatever a file or an argument made fail is one line
        print(f"sb3-safe-save {args.command}: error: {type(e).__name__}: {_clean_lines(e)}", file=sys.stderr)
        return EXIT_USAGE


# ============================================================================================ inspect
def _cmd_inspect(args: argparse.Namespace) -> int:
    from sb3_safe_save._file import _open, _parse
    from sb3_safe_save._weights import sha256_of

    with _open(args.path) as (f, size):  # a path or a URL (s3://...)
        header, manifest = _parse(f, size)
        sha = None if args.no_sha256 else sha256_of(f)
    tensors = sorted(header.tensors.items(), key=lambda kv: kv[1].start)
    if args.format == "json":
        doc = {
            "schema_version": 1,
            "path": os.fspath(args.path),
            "size_bytes": size,
            "sha256": sha,
            "format": manifest.format,
            "format_version": manifest.format_version,
            "algorithm": manifest.algorithm,
            "base_algorithm": manifest.base_algorithm,
            "versions": manifest.versions.model_dump(mode="json"),
            "placeholders": [p.model_dump(mode="json") for p in manifest.placeholders],
            "hazards": [h.model_dump(mode="json") for h in manifest.hazards],
            "tensors": [{"name": k, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes} for k, t in tensors],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    versions = clean(", ".join(f"{k} {v}" for k, v in manifest.versions.model_dump().items() if v is not None))
    lines = [
        f"File        {clean(args.path)}",
        f"Size        {format_size(size)} ({size} bytes; header {format_size(header.body_start)})",
        *([f"SHA-256     {sha}"] if sha else []),
        f"Format      {manifest.format} {manifest.format_version}",
        f"Algorithm   {manifest.algorithm} (base {manifest.base_algorithm})",
        f"Saved with  {versions}",
        "",
        f"Placeholders ({len(manifest.placeholders)})",
    ]
    if manifest.placeholders:
        rows = [
            [clean(p.key), clean(p.type), p.reason, _size_or_dash(p.size_bytes), clean(", ".join(p.paths))]
            for p in manifest.placeholders
        ]
        lines += table(["key", "type", "reason", "size", "paths"], rows, right={3})
    if manifest.hazards:
        lines += ["", f"Hazards ({len(manifest.hazards)})"]
        lines += table(["severity", "code", "detail"], [[h.severity, h.code, clean(h.message)] for h in manifest.hazards])
    total = sum(t.nbytes for _, t in tensors)
    lines += ["", f"Tensors ({len(tensors)}, {format_size(total)})"]
    rows = [[clean(k), t.dtype, "x".join(map(str, t.shape)) or "()", format_size(t.nbytes)] for k, t in tensors]
    lines += table(["name", "dtype", "shape", "size"], rows, right={3})
    print("\n".join(lines))
    return EXIT_OK


def _size_or_dash(n: int | None) -> str:
    return "-" if n is None else format_size(n)


# ============================================================================================== audit
@contextlib.contextmanager
def _output(name: str) -> Iterator[IO[str]]:
    if name == "-":
        yield sys.stdout
        return
    with open(name, "w", encoding="utf-8") as f:
        yield f


def _cmd_audit(args: argparse.Namespace) -> int:
    fail_on = None if args.fail_on == "never" else args.fail_on
    allow: bool | list[str] = args.allow_placeholder if args.no_placeholders else True
    reports: list[AuditReport] = []
    errors: dict[str, str] = {}
    algo = _algo_from_name(args.algo) if args.algo else None
    stock: list[Any] = []  # stock SB3 zips: what their pickles import and call, and the safe reader's verdict
    for path in args.paths:
        if _is_stock_zip(path):
            from sb3_safe_save._stock import audit_stock

            try:
                stock.append(audit_stock(path, trusted=args.trust or None))
            except SafeSaveError as e:
                errors[path] = str(e)
                print(f"sb3-safe-save audit: error: {clean(path)}: {_clean_lines(errors[path])}", file=sys.stderr)
            continue
        try:
            reports.append(
                audit(
                    path,
                    max_bytes=args.max_size,
                    fail_on=fail_on,
                    allow_placeholders=allow,
                    allow_pickle=args.allow_pickle,
                    trusted=args.trust or None,
                    algo=algo,
                )
            )
        except Exception as e:  # one unreadable file does not stop the others (and prints no traceback)
            errors[path] = str(e) if isinstance(e, (SafeSaveError, OSError)) else f"{type(e).__name__}: {e}"
            print(f"sb3-safe-save audit: error: {clean(path)}: {_clean_lines(errors[path])}", file=sys.stderr)
    shown = [_clean_report(r) for r in reports]
    with _output(args.output) as out:
        if args.format == "json":
            doc = json.loads(reports_json(reports, errors))
            if stock:
                doc["stock"] = [a.as_dict() for a in stock]
                doc["ok"] = doc["ok"] and all(a.accepted for a in stock)
            out.write(json.dumps(doc, indent=2) + "\n")
        elif args.format == "markdown":
            out.write("\n".join(r.markdown() for r in shown))
            out.write("".join(f"\n```\n{_clean_lines(a.text())}\n```\n" for a in stock))
        else:
            color = args.output == "-" and _color(out)
            out.write("\n\n".join(r.table(color=color) for r in shown) + ("\n" if shown else ""))
            out.write("".join(_clean_lines(a.text()) + "\n" for a in stock))
    err_color = _color(sys.stderr)
    for r in shown:
        print(r.summary() if not err_color else _paint_summary(r), file=sys.stderr)
    failed = [r.source for r in reports if not r.ok] + [a.source for a in stock if not a.accepted]
    print(
        f"audited {len(args.paths)} file{'s' if len(args.paths) != 1 else ''}:"
        f" {len(reports) + len(stock) - len(failed)} ok, {len(failed)} failed, {len(errors)} unreadable",
        file=sys.stderr,
    )
    if errors:
        return EXIT_USAGE
    return EXIT_FAIL if failed else EXIT_OK


def _is_stock_zip(path: str) -> bool:
    """A local zip file: a stock SB3 save (ours are safetensors)."""
    return not _remote_url(path) and os.path.isfile(path) and zipfile.is_zipfile(path)


def _remote_url(path: str) -> bool:
    return "://" in path


def _paint_summary(report: AuditReport) -> str:
    text = report.summary()
    word, _, rest = text.partition(":")
    return f"\x1b[{'32' if report.ok else '31'}m{word}\x1b[0m:{rest}"


# ============================================================================================ convert
def _cmd_convert(args: argparse.Namespace) -> int:
    if not zipfile.is_zipfile(args.zip_path):
        raise _UsageError(f"{args.zip_path} is not a zip file (stock SB3 saves are zips)")
    from sb3_safe_save._persist import save_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.trust_pickle:
            model, algo = _load_trusting(args)
        else:  # the safe reader: nothing in the file runs (see _stock.py)
            from sb3_safe_save._errors import StockPickleRefusedError
            from sb3_safe_save._stock import build_model, read_stock

            given = _algo_from_name(args.algo) if args.algo is not None else None
            try:
                stock = read_stock(args.zip_path, trusted=args.trust or None, home=given)
            except StockPickleRefusedError as e:
                raise _UsageError(
                    f"{args.zip_path}: {e.summary()}. If these are classes you trust, add"
                    f" {' '.join('--trust ' + r for r in e.refs)}; if you trust the file's author, add --trust-pickle"
                    " (runs code from the file)"
                ) from None
            algo = given or _guess_algo({**dict.fromkeys(stock.unreadable), **stock.data}, args.zip_path)
            model = build_model(algo, stock, device=args.device)
    for w in caught:
        print(f"sb3-safe-save convert: warning: {w.message}", file=sys.stderr)
    save_model(model, args.out, allow_pickle=args.allow_pickle)  # unreadable schedules: placeholders, as for our own
    from sb3_safe_save._file import read_manifest
    from sb3_safe_save._weights import saved_name

    out = saved_name(args.out)
    manifest = read_manifest(out)
    how = "unpickled by SB3" if args.trust_pickle else "read by the safe reader: no pickle was run"
    print(
        f"converted {args.zip_path} ({algo.__name__}) -> {out} ({format_size(os.path.getsize(out))}; {how})", file=sys.stderr
    )
    for ph in manifest.placeholders:
        print(f"  placeholder {ph.key!r}: {clean(ph.type)} at {clean(', '.join(ph.paths))} ({ph.reason})", file=sys.stderr)
    return EXIT_OK


def _load_trusting(args: argparse.Namespace) -> tuple[Any, type[Any]]:
    """SB3's own load (unpickles: runs code from the file); only with --trust-pickle."""
    from stable_baselines3.common.save_util import load_from_zip_file

    if args.algo is not None:
        algo = _algo_from_name(args.algo)
    else:
        data, _, _ = load_from_zip_file(args.zip_path, device="cpu")
        algo = _guess_algo(data or {}, args.zip_path)
    return algo.load(args.zip_path, device=args.device), algo


_ALGO_PACKAGES = ("stable_baselines3", "sb3_contrib")


def _algo_from_name(name: str) -> type[Any]:
    from stable_baselines3.common.base_class import BaseAlgorithm

    obj: Any = None
    if ":" in name or "." in name:
        module, _, qualname = name.partition(":") if ":" in name else name.rpartition(".")
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise _UsageError(f"--algo {name}: cannot import it ({e})") from None
    else:
        for package in _ALGO_PACKAGES:
            with contextlib.suppress(ImportError):
                obj = getattr(importlib.import_module(package), name, None)
            if obj is not None:
                break
    if not (isinstance(obj, type) and issubclass(obj, BaseAlgorithm)):
        raise _UsageError(f"--algo {name}: not a stable_baselines3 or sb3_contrib algorithm class")
    return obj


def _guess_algo(data: dict[str, Any], path: str) -> type[Any]:
    """The algorithm that wrote a stock zip (``_stock.guess_algorithm``), or a usage error naming ``--algo``."""
    from sb3_safe_save._stock import guess_algorithm

    found = guess_algorithm(data)
    if found is None:
        policy = data.get("policy_class")
        raise _UsageError(
            f"cannot tell which algorithm wrote {path} (policy class"
            f" {getattr(policy, '__module__', '')}.{getattr(policy, '__qualname__', policy)});"
            " pass it with --algo, e.g. --algo DQN or --algo mypackage.module:MyAlgo"
        )
    return found


# ============================================================================================= export
def _cmd_export(args: argparse.Namespace) -> int:
    from stable_baselines3.common.base_class import BaseAlgorithm

    from sb3_safe_save._errors import PickleRefusedError, UntrustedTypeError
    from sb3_safe_save._file import read_manifest
    from sb3_safe_save._persist import load_model

    if not str(args.out).endswith(".zip"):
        raise _UsageError(f"{args.out}: the output of export must end in .zip (stock SB3 would add the suffix)")
    manifest = read_manifest(args.path)
    if TrustList(None).why(manifest.base_algorithm, "algorithm") != "default":
        raise _UsageError(
            f"{args.path}: base algorithm {manifest.base_algorithm} is not a stable_baselines3/sb3_contrib algorithm"
        )
    base = TrustList(None).resolve(manifest.base_algorithm, "base_algorithm", "algorithm")
    trusted = args.trust or None
    # placeholders stay empty (None): the zip is written without them, and they are listed below
    left_out = {p.key: None for p in manifest.placeholders}
    try:
        overrides = _optimizers_without_left_out(args.path, trusted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fingerprint mismatches of the None stand-ins
            model = load_model(
                base, args.path, device="cpu", custom_objects=overrides, resources=left_out, trusted=trusted,
                allow_pickle=args.allow_pickle, strict=False,
            )  # fmt: skip
    except UntrustedTypeError as e:
        flags = " ".join(f"--trust {r}" for r in e.refs)
        raise _UsageError(
            f"{args.path} references types that are not trusted: {', '.join(e.refs)}; if you trust it, add {flags}"
        ) from None
    except PickleRefusedError as e:
        raise _UsageError(
            f"{args.path} holds pickled values ({', '.join(e.paths)});"
            " if you trust it, add --allow-pickle (runs code from the file)"
        ) from None
    BaseAlgorithm.save(model, args.out)
    print(f"exported {args.path} -> {args.out} ({format_size(os.path.getsize(args.out))}, stock SB3 zip)", file=sys.stderr)
    for ph in manifest.placeholders:
        print(
            f"  left out placeholder {ph.key!r}: {clean(ph.type)} at {clean(', '.join(ph.paths))} (None in the zip)",
            file=sys.stderr,
        )
    return EXIT_OK


def _optimizers_without_left_out(path: str, trusted: list[str] | None) -> dict[str, Any]:
    """Optimizer states renumbered as if the parameters of left-out resources had never been in them.

    A saved optimizer that held an external module's parameters keeps them in its ``param_groups``
    (``OptimizerState.dropped``); without the module the rebuilt optimizer has fewer parameters.
    """
    from sb3_safe_save import _weights
    from sb3_safe_save._file import _open, _parse
    from sb3_safe_save._manifest import OptimizerState
    from sb3_safe_save._persist import _Decoder

    overrides: dict[str, Any] = {}
    with _open(path) as (f, size):
        header, manifest = _parse(f, size)
        entries = [e for e in manifest.state_dicts if isinstance(e, OptimizerState) and e.dropped]
        if not entries:
            return overrides
        body = _weights.Body(f, header, {k: m.xxh3 for k, m in manifest.tensors.items()})
        decoder = _Decoder(body, TrustList(trusted), {}, {}, manifest)
        for entry in entries:
            state = decoder.decode(entry.state, entry.name)
            dropped = set(entry.dropped)
            order = [i for group in state["param_groups"] for i in group["params"]]
            renumber = {old: new for new, old in enumerate(i for i in order if i not in dropped)}
            state["param_groups"] = [
                {**group, "params": [renumber[i] for i in group["params"] if i not in dropped]}
                for group in state["param_groups"]
            ]
            state["state"] = {renumber[i]: s for i, s in state["state"].items() if i in renumber}
            overrides[entry.name] = state
    return overrides
