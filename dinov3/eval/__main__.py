"""``python -m dinov3.eval``: the same as the ``dinov3-eval`` command."""

import sys

from .cli import main

sys.exit(main())
