"""``python -m sb3_safe_save.zoo train|enjoy|push ARGS``: rl-zoo3's own loops, every artifact in our format.

ARGS are rl-zoo3's own arguments (``--algo ppo --env CartPole-v1 -n 2000 -f logs``), plus ``--trust NAME``
(repeatable) for classes a model or config may reference beyond the defaults. What is patched is listed in
``sb3_safe_save._zoo``. ``push`` shares a run on the Hugging Face Hub (``sb3_safe_save.push_to_hub``).
Needs the ``zoo`` extra: ``pip install "sb3-safe-save[zoo]"``.
"""

from __future__ import annotations

import importlib.metadata
import sys
import traceback
import warnings

USAGE = (
    "usage: python -m sb3_safe_save.zoo {train,enjoy} [rl-zoo3 arguments] [--trust NAME ...]\n"
    "       python -m sb3_safe_save.zoo push --algo ALGO --env ENV -f FOLDER --repo-id ORG/NAME [--output FOLDER]"
)


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status (2: a usage error or a refused file, 1: another error).

    Errors go to stderr with every non-printable character escaped (``\\x1b``, ``\\u202e``): they may quote
    a run folder's config, which must not drive the terminal.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    try:
        version = importlib.metadata.version("rl_zoo3")
    except importlib.metadata.PackageNotFoundError:
        print('sb3_safe_save.zoo needs rl-zoo3: pip install "sb3-safe-save[zoo]"', file=sys.stderr)
        return 2
    from sb3_safe_save._cli import _clean_lines, _show_warning
    from sb3_safe_save._errors import SafeSaveError
    from sb3_safe_save._zoo import ZooUsageError, check_version, run

    # a run folder's config.yml/args.yml is the file's text: every message that may quote it is escaped
    try:
        check_version(version)
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            run(args[0], args[1:])
    except ZooUsageError as e:
        print(f"{USAGE}\nerror: {_clean_lines(e)}", file=sys.stderr)
        return 2
    except SafeSaveError as e:  # a refused file or config: its reason, no traceback
        print(f"sb3_safe_save.zoo {_clean_lines(args[0])}: error: {_clean_lines(e)}", file=sys.stderr)
        return 2
    except Exception:  # rl-zoo3's, gymnasium's or a wrapper's own error: the traceback, escaped
        print(_clean_lines(traceback.format_exc().rstrip("\n")), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
