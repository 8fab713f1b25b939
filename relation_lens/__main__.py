"""``python -m relation_lens ...`` (and ``torchrun ... -m relation_lens ...``): the command line."""

import sys

from relation_lens.cli import main

sys.exit(main())
