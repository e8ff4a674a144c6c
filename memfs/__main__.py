"""`python3 -m memfs ...`: set up whatever is missing, then run the command.

Run from a checkout with any Python 3, as root, this installs the Debian
packages, the virtual environment and the native build it needs (each
step only when missing or stale), then re-runs itself inside the venv.
"""
import sys

from .dev.bootstrap import ensure_environment

if __name__ == "__main__":
    ensure_environment(sys.argv[1:])
    from .cli import main

    sys.exit(main())
