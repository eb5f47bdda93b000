"""``python -m kubeseg``: the same as the ``kubeseg`` command (used under torchrun)."""
import sys

from kubeseg.cli import main

sys.exit(main())
