"""The library front door (`import codeshard`): a published index, searched by id, vector or raw input."""
from __future__ import annotations

import numpy as np

from infra import layout
from infra.search import Searcher, SearchResult, query_feature
from infra.settings import Settings
from infra.store import open_store


class Index:
    """A published index of a store, by name. Loads CURRENT's version on first use (the index file
    and ids, ~N x bytes per item in RAM) and reloads when CURRENT moves (checked at most every
    `poll_seconds`)."""

    def __init__(self, searcher: Searcher, settings: Settings) -> None:
        self._searcher = searcher
        self._settings = settings

    @property
    def version(self) -> int:
        """The published version searched now."""
        return self._searcher.current().version

    @property
    def model_id(self) -> str | None:
        """The encoder whose features this index's codes were made from (for raw-input queries)."""
        return self._searcher.current().build.model_id

    def search(self, vectors: np.ndarray, k: int = 10) -> SearchResult:
        """Top-k for each row of `vectors` ((n, D) float32 features of this index's model)."""
        return self._searcher.search(np.atleast_2d(np.asarray(vectors, np.float32)), k)

    def search_by_id(self, item_id: int, k: int = 10) -> SearchResult:
        """Top-k for a stored item (its stored feature is the query)."""
        return self._searcher.search_by_id(int(item_id), k)

    def search_image(self, image: bytes, k: int = 10) -> SearchResult:
        """Top-k for an encoded image (PNG/JPEG bytes), embedded with the index's model."""
        return self.search(self._embed(image=image), k)

    def search_text(self, text: str, k: int = 10) -> SearchResult:
        """Top-k for a text, embedded with the index's model."""
        return self.search(self._embed(text=text), k)

    def _embed(self, image: bytes | None = None, text: str | None = None) -> np.ndarray:
        if not self.model_id:
            raise ValueError("this index records no model_id: search it by id or by feature vector")
        return query_feature(self._searcher.store, self.model_id, image=image, text=text,
                             device=self._settings.torch_device())


def open_index(name: str, store: str | None = None, *, s3_endpoint: str | None = None,
               poll_seconds: float = 5.0) -> Index:
    """The published index `name` in `store` (file:///path or s3://bucket/prefix; default: the
    settings' store, CODESHARD_STORE). Raises ValueError for a bad name or a store that does not
    exist, LookupError when no such index was published. Cost: CURRENT's version is loaded now
    (its index file and ids), so a bad name fails here rather than at the first search."""
    layout.check_name("index", name)
    settings = Settings.load(store=store, s3_endpoint=s3_endpoint)
    searcher = Searcher(open_store(settings).require_existing(), name, poll_seconds=poll_seconds)
    searcher.current()
    return Index(searcher, settings)
