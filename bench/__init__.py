"""normfuse benchmark suite: ``python -m bench --help``."""
