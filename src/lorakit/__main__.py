"""``python -m lorakit``: the ``lorakit`` command."""
import sys

from .cli import main

sys.exit(main())
