"""`python -m streamctx ...`: the same as the `streamctx` console script."""

import sys

from streamctx.cli import main

sys.exit(main())
