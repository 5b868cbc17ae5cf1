"""Data in: reading files and frames, splits, packaged offline assets, the cache folder rule."""
