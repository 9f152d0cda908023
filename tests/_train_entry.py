"""`fastsft ...` with the built-in synthetic data shrunk (for torchrun-launched tests):
python tests/_train_entry.py TRAIN_RECORDS EVAL_RECORDS EXACT_MATCH_ITEMS train key=value ..."""

import sys

from fastsft.cli import main
from fastsft.train import loop

if __name__ == "__main__":
    loop.SYNTHETIC_TRAIN_RECORDS, loop.SYNTHETIC_EVAL_RECORDS, loop.EXACT_MATCH_ITEMS = map(int, sys.argv[1:4])
    sys.exit(main(sys.argv[4:]))
