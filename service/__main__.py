"""``python -m service``: the same as ``robustnorm-serve``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
