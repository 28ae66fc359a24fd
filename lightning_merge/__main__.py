"""``python -m lightning_merge``: the ``lightning-merge`` command (also ``torchrun ... -m lightning_merge ...``)."""

import sys

from lightning_merge.cli import main

sys.exit(main())
