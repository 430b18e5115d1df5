"""`python -m outloop_tui`: the same as the `outloop` command."""

import sys

from outloop_tui.cli import main

sys.exit(main())
