"""fastsft.train: see ../shared/DESIGN.md (arrives with its own issue)."""
