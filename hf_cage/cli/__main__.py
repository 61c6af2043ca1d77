"""``python -m hf_cage.cli``: the same as the ``hf-cage`` command."""

import sys

from . import main

sys.exit(main())
