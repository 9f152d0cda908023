"""fastsft.data: see ../shared/DESIGN.md (arrives with its own issue)."""
