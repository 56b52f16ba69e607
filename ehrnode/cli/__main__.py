"""``python -m ehrnode.cli``: the ``ehrnode`` command."""

import sys

from . import main

sys.exit(main())
