"""``python -m normfuse``: what normfuse can run here and why not where it cannot (normfuse/info.py)."""
import sys

from .info import main

sys.exit(main())
