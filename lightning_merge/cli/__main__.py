"""``python -m lightning_merge.cli``: the ``lightning-merge`` command."""

import sys

from lightning_merge.cli import main

sys.exit(main())
