"""``python -m llm_adapter`` — the ``llm-adapter`` command line (see :mod:`llm_adapter.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
