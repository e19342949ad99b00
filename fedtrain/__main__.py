"""``python -m fedtrain``: the same as the ``fedtrain`` command."""

import sys

from fedtrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
