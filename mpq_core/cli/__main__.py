"""``python -m mpq_core.cli``: the ``mpq`` command."""

import sys

from mpq_core.cli import main

sys.exit(main())
