"""`fastsft ...` with the built-in synthetic data shrunk (for torchrun-launched tests):
python tests/_train_entry.py TRAIN_RECORDS EVAL_RECORDS EXACT_MATCH_ITEMS train key=value ..."""

import sys

from fastsft.cli import main
from fastsft.train import build, evaluation

if __name__ == "__main__":
    build.SYNTHETIC_TRAIN_RECORDS, build.SYNTHETIC_EVAL_RECORDS, evaluation.EXACT_MATCH_ITEMS = map(int, sys.argv[1:4])
    sys.exit(main(sys.argv[4:]))
