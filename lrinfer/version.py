"""The package version (one owner: pyproject.toml reads the same number in its own field)."""
__version__ = "0.1.0"
