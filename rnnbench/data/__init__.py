"""Dataset layer: where files come from (resolve.py) and how they are read (one reader per format)."""
