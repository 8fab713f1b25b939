"""The library's version (read by pyproject.toml and written into every result's JSON)."""

__version__ = "0.1.0"
