"""`python -m agentmem` runs the command line."""

import sys

from agentmem.cli import main

sys.exit(main())
