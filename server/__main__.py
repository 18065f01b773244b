"""The `omniloader` command (also `python -m server`); the commands live in server/cli/."""
from __future__ import annotations

import sys

from server.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
