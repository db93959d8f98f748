"""``python -m pycompress.cli ...`` (e.g. under ``torchrun``): the same as the ``pycompress`` command."""

import sys

from pycompress.cli import main

sys.exit(main())
