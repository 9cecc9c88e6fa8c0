"""codeshard as a library: open a published index by name and search it.

    import codeshard
    index = codeshard.open_index("fashion-mnist-drq-64-fashion-mnist-small-cnn-32b", store="s3://bucket/prefix")
    index.search_by_id(60001, k=10).hits[0]          # or .search(vectors) / .search_image(png) / .search_text(s)

The index follows its CURRENT pointer (an atomic refresh is picked up within `poll_seconds`).
Credentials come from the standard AWS chain, never from arguments.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from codeshard.api import Index, open_index
from infra.search import SearchResult

try:
    __version__ = version("codeshard")
except PackageNotFoundError:  # a source checkout that was not installed
    __version__ = "0+unknown"

__all__ = ["Index", "SearchResult", "open_index", "__version__"]
