"""Every error sb3_safe_save raises, in one place.

Each error says what was wrong, where (the attribute path or tensor key) and how to fix it.
Catch ``SafeSaveError`` to handle them all. Where a builtin type fits, the error also subclasses
it, so code that already catches ``ValueError``/``TypeError``/``LookupError`` keeps working::

    SafeSaveError
    ├── UnsupportedObjectError (TypeError)   save: a value has no codec and pickling was not allowed
    ├── FormatError (ValueError)             load: not an sb3_safe_save file, malformed header or manifest
    │   └── UnsupportedVersionError          load: a format version this release cannot read
    ├── IntegrityError (ValueError)          load: size or checksum mismatch (truncated or corrupted file)
    ├── UntrustedTypeError (TypeError)       load: the file references classes or functions not on the trust list
    ├── PickleRefusedError (ValueError)      load: the file holds pickled values and ``allow_pickle`` was not given
    │   └── StockPickleRefusedError          a stock SB3 file's pickle names what the safe reader will not follow
    ├── MissingResourceError (LookupError)   load: a placeholder has no live object to rebind
    ├── ResourceMismatchError (ValueError)   load: a rebound resource does not match its recorded fingerprint
    ├── AlgorithmMismatchError (TypeError)   load: the file was saved by a different algorithm
    ├── StateMismatchError (ValueError)      load: the stored tensors (or the env's spaces) do not fit the model
    ├── SaveTargetIsADirectoryError / SaveTargetDirectoryMissingError (IsADirectoryError / FileNotFoundError)
    │                                        save: the target path is a directory, or its directory cannot be created
    ├── LoadSourceIsADirectoryError / LoadSourceNotFoundError (IsADirectoryError / FileNotFoundError)
    │                                        load: the path is a directory (a checkpoint folder?), or no file is there
    ├── HazardError (RuntimeError)           build/learn: training would destroy a live resource (see ``_hazards.py``)
    ├── RemoteStorageUnavailableError (ImportError)  a URL path (s3://...) without fsspec or its backend installed
    ├── CheckpointWriteError (RuntimeError)  a checkpoint written in the background failed (next call or wait)
    └── UnresolvedResourceError (RuntimeError)  use: an optional resource that was left unbound was used

Warnings (``UserWarning`` subclasses): ``HazardWarning``, what training may do to a resource (warned when the
model is built or loaded, once per model); ``SaveWarning``, a save that writes a file that cannot be loaded as is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


class SafeSaveError(Exception):
    """Base class of every error raised by sb3_safe_save."""


def _bullets(lines: Iterable[str]) -> str:
    return "".join(f"\n  - {line}" for line in lines)


class UnsupportedObjectError(SafeSaveError, TypeError):
    """Raised by ``save`` when values have no codec and may not be pickled.

    :param problems: ``(attribute path, type name, detail)`` for each offending value
    """

    def __init__(self, problems: Sequence[tuple[str, str, str]]) -> None:
        self.problems = list(problems)
        paths = [p for p, _, _ in self.problems]
        lines = [f"{path}: {type_name} ({detail})" for path, type_name, detail in self.problems]
        super().__init__(
            "Cannot save these values: no codec encodes them and pickling was not allowed:"
            + _bullets(lines)
            + "\nFix one of:"
            + f"\n  - leave them out: model.save(path, exclude={sorted({p.split('.')[0].split('[')[0] for p in paths})!r})"
            + "\n  - declare them as resources to rebind at load: model.save(path, resources={'<key>': obj})"
            + "\n  - replace them by a supported value (a SB3 schedule class, a module-level class or function)"
            + "\n  - allow a visible pickle fallback: model.save(path, allow_pickle=True)"
            + " (loading it then needs allow_pickle=True)"
        )


class FormatError(SafeSaveError, ValueError):
    """Raised when a file is not an sb3_safe_save file, or its header or manifest is malformed.

    A file that is neither a zip nor ours says so, keeping SB3's wording "wasn't a zip-file".
    """


class UnsupportedVersionError(FormatError):
    """Raised when a file's format version is newer (or older) than this release can read."""


class IntegrityError(SafeSaveError, ValueError):
    """Raised when a file's sizes or checksums do not match its manifest (truncated or corrupted)."""


class UntrustedTypeError(SafeSaveError, TypeError):
    """Raised at load when the file references classes or functions that are not trusted.

    Nothing referenced by the file has been imported when this is raised.

    :param refs: the untrusted ``"module:Qualname"`` references, sorted
    :param where: reference -> the attribute paths that use it
    :param algo: the class ``load`` was called on (the message then shows its name in the fix)
    :param call: the call that was made, when not ``<algo>.load`` (e.g. ``"sb3_safe_save.load_policy"``)
    """

    def __init__(
        self, refs: Sequence[str], where: dict[str, list[str]] | None = None, algo: type | None = None, call: str | None = None
    ) -> None:
        self.refs = sorted(refs)
        where = where or {}
        lines = [f"{ref}  (used at {', '.join(where.get(ref, [])[:3]) or 'manifest'})" for ref in self.refs]
        classes = ", ".join(r.rpartition(":")[2].rpartition(".")[2] for r in self.refs)
        if call is None:
            call = f"{algo_name(algo)}.load" if algo is not None else "Algo.load"
        base = base_name(algo) if algo is not None else "Algo"
        once = ""
        if algo is not None and "_sb3_safe_base" in vars(algo):  # made by safe(): a trusting one
            once = f"\nor once, on the algorithm class:\n  safe({made_from(algo).__name__}, trusted=[{classes}]).load(path)"
        elif algo is not None and call.endswith(".load"):
            once = (
                "\nor once, on the algorithm class (next to safe_save_resources):"
                f"\n  class {algo.__qualname__}(SafeSaveMixin, {base}):\n      safe_save_trusted = ({classes},)"
            )
        super().__init__(
            "The file references types that are not trusted; nothing was imported:"
            + _bullets(lines)
            + "\nIf you trust them, name them exactly (class objects or 'module:QualName' strings), either per load:"
            + f"\n  {call}(path, trusted={self.refs!r})"
            + once
            + "\nor process-wide with sb3_safe_save.trust(...)."
            + (
                "\nA class defined inside a function (<locals>) cannot be imported by name: pass the class object"
                f" itself, trusted=[{', '.join(r.rpartition('.')[2] for r in self.refs if '<locals>' in r)}]"
                if any("<locals>" in r for r in self.refs)
                else ""
            )
        )


_SB3 = ("stable_baselines3.", "sb3_contrib.")


def base_name(algo: type) -> str:
    """The SB3 / sb3-contrib algorithm a class derives from, by name (``DQN``)."""
    return next((k.__name__ for k in algo.__mro__ if is_sb3_class(k)), algo.__name__)


def is_sb3_class(cls: type) -> bool:
    """A class SB3 or sb3-contrib defines: found under its name in its module (not a subclass that borrows the module)."""
    module = sys.modules.get(cls.__module__)
    return cls.__module__.startswith(_SB3) and module is not None and vars(module).get(cls.__name__) is cls


def made_from(algo: type) -> type:
    """The class ``safe()`` made ``algo`` from (``DQN`` for ``safe(DQN)``); ``algo`` itself if ``safe()`` did not make it."""
    while "_sb3_safe_base" in vars(algo):
        algo = vars(algo)["_sb3_safe_base"]
    return algo


def algo_name(algo: type) -> str:
    """How the user wrote the class in their code: ``safe(DQN)`` for a class made by ``safe()``, else its name."""
    return f"safe({made_from(algo).__name__})" if "_sb3_safe_base" in vars(algo) else algo.__qualname__


class PickleRefusedError(SafeSaveError, ValueError):
    """Raised at load when the file holds pickled values and neither ``allow_pickle`` nor ``custom_objects`` covers them."""

    def __init__(self, paths: Sequence[str], message: str | None = None) -> None:
        self.paths = sorted(paths)
        if message is not None:  # e.g. a whole legacy pickle file (a replay buffer .pkl)
            super().__init__(message)
            return
        supplied = ", ".join(repr(p) + ": ..." for p in self.paths)
        super().__init__(
            "The file holds pickled values; unpickling can run arbitrary code, so they were refused:"
            + _bullets(self.paths)
            + "\nFix one of:"
            + f"\n  - supply them yourself: Algo.load(path, custom_objects={{{supplied}}})"
            + "\n  - if you trust the file's author: Algo.load(path, allow_pickle=True)"
        )


class StockPickleRefusedError(PickleRefusedError):
    """Raised when a pickle in a stock SB3 file names something the safe reader will not import or call.

    Nothing the file names was imported or called when this is raised.

    :param refused: reference -> the places (data keys, attribute paths) that use it
    :param detail: one line on the kind of file (optional)
    :param reasons: reference -> why it was refused (default: not trusted)
    """

    def __init__(
        self, refused: dict[str, list[str]], detail: str | None = None, reasons: dict[str, str] | None = None
    ) -> None:
        self.refused = {ref: list(paths) for ref, paths in sorted(refused.items())}
        self.refs = list(self.refused)
        reasons = reasons or {}
        lines = [
            f"{ref}  (used at {', '.join(paths[:3])}; {reasons.get(ref, 'not trusted')})"
            for ref, paths in self.refused.items()
        ]
        super().__init__(
            sorted({p for paths in self.refused.values() for p in paths}),
            "The stock SB3 file's pickles name what the safe reader does not import or call; nothing was run:"
            + (f" {detail}" if detail else "")
            + _bullets(lines)
            + "\nFix one of:"
            + f"\n  - if these are classes you trust (functions and calls are never followed): trusted={self.refs!r}"
            + " (CLI: --trust REF)"
            + "\n  - if you trust the file's author: let SB3 unpickle it, which runs it (load_replay_buffer(...,"
            + " allow_pickle=True); SB3's own Algo.load or VecNormalize.load; CLI: convert --trust-pickle)",
        )

    def summary(self) -> str:
        """One line: the references that stopped the reader."""
        return "refused by the safe reader: " + ", ".join(f"{r} (at {', '.join(p[:2])})" for r, p in self.refused.items())


class MissingResourceError(SafeSaveError, LookupError):
    """Raised at load, before any model is built, when placeholders have no live object.

    :param missing: ``(key, paths, type name, hint)`` for each unresolved placeholder
    :param call: the load call that was made (``"CustomDQN.load"``), shown in the fix
    :param typos: missing key -> the key given in ``resources=`` that looks like a misspelling of it
    """

    def __init__(
        self,
        missing: Sequence[tuple[str, Sequence[str], str, dict[str, object]]],
        call: str = "Algo.load",
        typos: dict[str, str] | None = None,
    ) -> None:
        self.missing = list(missing)
        self.keys = [key for key, _, _, _ in self.missing]
        typos = typos or {}
        lines = []
        for key, paths, type_name, hint in self.missing:
            extra = f", hint {hint}" if hint else ""
            typo = f" (did you mean {key!r}? resources= has {typos[key]!r})" if key in typos else ""
            lines.append(f"{key!r}: a {type_name} at {', '.join(paths)}{extra}{typo}")
        example = ", ".join(f"{k!r}: <{k}>" for k in self.keys)
        super().__init__(
            "The file needs live resources that were not supplied:"
            + _bullets(lines)
            + f"\nPass them at load: {call}(path, resources={{{example}}})"
            + "\nor register a factory: sb3_safe_save.register_resource(key, factory),"
            + " or an entry point in the group 'sb3_safe_save.resources'."
        )

    def __str__(self) -> str:  # LookupError/KeyError-style quoting would mangle the message
        return str(self.args[0])


class ResourceMismatchError(SafeSaveError, ValueError):
    """Raised when a rebound resource does not match the fingerprint recorded at save."""


class AlgorithmMismatchError(SafeSaveError, TypeError):
    """Raised when a file saved by one algorithm is loaded with another (e.g. a DQN file with ``PPO.load``)."""


class StateMismatchError(SafeSaveError, ValueError):
    """Raised when stored tensors or optimizer state do not fit the model that was rebuilt."""


class UnresolvedResourceError(SafeSaveError, RuntimeError):
    """Raised when an optional resource that was left unbound at load is used."""


class HazardError(SafeSaveError, RuntimeError):
    """Raised before training would destroy a live resource: when the model is built, or at the start of ``learn()``.

    E.g. an ``nn.Module`` expert registered in both ``q_net`` and ``q_net_target``: SB3's target update
    writes into its tensors in place (with ``tau=1``, zeros). Nothing has been changed when it is raised.
    The message names the fix, ``self.vlm_model = sb3_safe_save.external(vlm_model)``.
    """


class LoadSourceIsADirectoryError(SafeSaveError, IsADirectoryError):
    """Raised by ``load`` when the path is a directory (a checkpoint folder is read with ``load_checkpoint``)."""


class LoadSourceNotFoundError(SafeSaveError, FileNotFoundError):
    """Raised by ``load`` when no file is at the path (nor at the name ``save`` would have written)."""


class SaveTargetIsADirectoryError(SafeSaveError, IsADirectoryError):
    """Raised by ``save`` when the target path is a directory (still an ``IsADirectoryError``, as in SB3)."""


class SaveTargetDirectoryMissingError(SafeSaveError, FileNotFoundError):
    """Raised by ``save`` when the target's missing directory cannot be created (still a ``FileNotFoundError``)."""


class RemoteStorageUnavailableError(SafeSaveError, ImportError):
    """Raised for a URL path (``s3://``, ``gs://``, ...) when fsspec or the backend it needs is not installed.

    Install the extra: ``pip install "sb3-safe-save[remote]"`` (fsspec and s3fs).
    """


class CheckpointWriteError(SafeSaveError, RuntimeError):
    """Raised by the next checkpoint, or by ``wait_for_checkpoint()``, when a checkpoint written in the background failed.

    No part of it is left under its name and the earlier checkpoints are unchanged. The original
    exception is ``__cause__`` (and ``cause``).

    :param path: the checkpoint directory that was not written
    :param cause: what the write raised
    """

    def __init__(self, path: Path, cause: BaseException) -> None:
        self.path = path
        self.cause = cause
        super().__init__(
            f"the checkpoint {path} was not written: its background write failed with {type(cause).__name__}: {cause}."
            "\nNo part of it was left under that name and the earlier checkpoints are unchanged."
            " Fix the cause (disk space, permissions, the path) and take the checkpoint again."
        )


class HazardWarning(UserWarning):
    """Warned once per model, when it is built or loaded, for what training may do to a live resource.

    E.g. an expert's trainable parameters in the optimizer (fine if you mean to fine-tune it), or an
    expert registered in both ``q_net`` and ``q_net_target`` (then ``learn()`` raises ``HazardError``).
    The message names the fix, ``sb3_safe_save.external()``. Make it an error with
    ``warnings.simplefilter("error", HazardWarning)``.
    """


class SaveWarning(UserWarning):
    """Warned by ``save`` (once per model) when the file it writes cannot be loaded without more arguments.

    E.g. ``_excluded_save_params()`` that leaves out ``policy_kwargs`` (SB3 #2025's workaround): the file
    then needs ``load(path, policy_kwargs=...)``. With sb3_safe_save the exclusion is unnecessary.
    """
