"""``python -m sb3_safe_save``: the ``sb3-safe-save`` command."""

import sys

from sb3_safe_save._cli import main

if __name__ == "__main__":
    sys.exit(main())
