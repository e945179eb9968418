"""``python -m bench.gpu [--dry-run] [--out DIR]``: see ``bench.gpu.check``."""

import sys

from bench.gpu.check import main

sys.exit(main())
