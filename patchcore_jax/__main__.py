"""``python -m patchcore_jax ...``: the ``patchcore-jax`` command line (``cli.main``)."""

import sys

from patchcore_jax.cli import main

sys.exit(main())
