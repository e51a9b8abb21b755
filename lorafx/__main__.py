"""``python -m lorafx ...``: the lorafx command line (see lorafx.cli)."""
import sys

from lorafx.cli import main

if __name__ == "__main__":
    sys.exit(main())
