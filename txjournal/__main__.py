"""``python -m txjournal``: see :mod:`txjournal.cli`."""

import sys

from txjournal.cli import main

if __name__ == "__main__":
    sys.exit(main())
