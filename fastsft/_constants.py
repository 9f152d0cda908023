"""Constants that layers which must not import each other (fastsft.data, fastsft.patch) share: one definition.

No imports at all, so any layer may import it.
"""

# The label of a position that is no loss target (prompt tokens, each document's last position): torch's
# cross_entropy ignores it by default and Hugging Face models use it, so fastsft's labels mean the same to both.
IGNORE_INDEX = -100
