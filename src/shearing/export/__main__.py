"""``python -m shearing.export``: see ``shearing.export.hf``."""

import sys

from shearing.export.hf import main

if __name__ == "__main__":
    sys.exit(main())
