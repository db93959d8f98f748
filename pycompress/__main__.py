"""``python -m pycompress ...``: the same as the ``pycompress`` command."""

import sys

from pycompress.cli import main

sys.exit(main())
