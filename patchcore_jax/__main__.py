"""``python -m patchcore_jax ...`` and the ``patchcore-jax`` command: the command line
(``cli.main``).

The command line is imported when it runs, not when this module is imported: the image-reading
worker processes (``image_reader``, started with ``spawn``) import the main script of the
process that starts them, and a worker must not import jax.
"""

import sys


def main() -> int:
    """Runs the command line on ``sys.argv``; returns its exit status."""
    from patchcore_jax.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
