"""Rank allocators that live in their own files (registered on import by `lrinfer.allocation`)."""
