"""Per-case inference and what training and inference share at run time."""
