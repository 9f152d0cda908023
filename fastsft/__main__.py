"""`python -m fastsft ...` (and `torchrun --nproc-per-node N -m fastsft train ...`): the `fastsft` command."""

import sys

from fastsft.cli import main

sys.exit(main())
