"""``python -m climseg COMMAND ...``: the same as the ``climseg`` command."""

import sys

from climseg.cli import main

sys.exit(main())
