"""``python -m pyswtask``: the ``pyswtask`` command (``cli``); nothing else lives here."""

import sys

from .cli import main

sys.exit(main())
