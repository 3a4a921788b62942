"""``python -m diffreg`` (see :mod:`diffreg.cli`)."""

import sys

from diffreg.cli import main

sys.exit(main())
