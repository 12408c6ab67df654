"""``python -m sparsekern``: the command line (``torchrun -m sparsekern train ...`` launches it per process)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
