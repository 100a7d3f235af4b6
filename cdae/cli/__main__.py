"""``python -m cdae.cli``: the ``cdae`` command."""

import sys

from cdae.cli import main

sys.exit(main())
