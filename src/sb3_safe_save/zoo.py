"""``python -m sb3_safe_save.zoo train|enjoy|push ARGS``: rl-zoo3's own loops, every artifact in our format.

ARGS are rl-zoo3's own arguments (``--algo ppo --env CartPole-v1 -n 2000 -f logs``), plus ``--trust NAME``
(repeatable) for classes a model or config may reference beyond the defaults. What is patched is listed in
``sb3_safe_save._zoo``. ``push`` shares a run on the Hugging Face Hub (``sb3_safe_save.push_to_hub``).
Needs the ``zoo`` extra: ``pip install "sb3-safe-save[zoo]"``.
"""

from __future__ import annotations

import importlib.metadata
import sys

USAGE = (
    "usage: python -m sb3_safe_save.zoo {train,enjoy} [rl-zoo3 arguments] [--trust NAME ...]\n"
    "       python -m sb3_safe_save.zoo push --algo ALGO --env ENV -f FOLDER --repo-id ORG/NAME [--output FOLDER]"
)


def main(argv: list[str] | None = None) -> int:
    """Run the command; return the exit status (2 for a usage error, with the reason on stderr)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    try:
        version = importlib.metadata.version("rl_zoo3")
    except importlib.metadata.PackageNotFoundError:
        print('sb3_safe_save.zoo needs rl-zoo3: pip install "sb3-safe-save[zoo]"', file=sys.stderr)
        return 2
    from sb3_safe_save._zoo import ZooUsageError, check_version, run

    try:
        check_version(version)
        run(args[0], args[1:])
    except ZooUsageError as e:
        print(f"{USAGE}\nerror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
