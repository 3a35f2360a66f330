"""`python -m benchmarks.ruler`: see benchmarks/ruler/__init__.py and `--help`."""

import sys

from benchmarks.ruler.runner import main

if __name__ == "__main__":
    sys.exit(main())
