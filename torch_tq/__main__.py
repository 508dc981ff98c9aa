"""``python -m torch_tq``: the ``torch-tq`` command."""

import sys

from .cli import main

sys.exit(main())
