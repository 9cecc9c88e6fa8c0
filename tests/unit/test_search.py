"""infra/search.py, the parts that need no index: k is checked, and an id maps to its position or
raises SearchError naming the index and version."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from infra import index_versions as iv
from infra.search import LoadedVersion, SearchError, check_k


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "3", None])
def test_k_must_be_an_integer_of_at_least_one(k):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        check_k(k)


def test_k_of_one_or_more_is_accepted():
    check_k(1)
    check_k(np.int64(10))


def test_an_id_maps_to_its_position_and_a_missing_id_names_the_index():
    ids = np.array([70, 10, 50, 30], dtype=np.int64)
    build = iv.BuildRecord(format=iv.FORMAT, name="d-itq-64b", mode="build", dataset="d", coder_id="itq",
                           coder_checksum="c", method="itq", model_id=None, bits=64, memory_budget=1)
    lv = LoadedVersion(4, SimpleNamespace(ids=ids), build, None, np.argsort(ids, kind="stable"))
    assert [lv.position_of(i) for i in (70, 10, 50, 30)] == [0, 1, 2, 3]
    with pytest.raises(SearchError, match="id 40 is not in index d-itq-64b v4"):
        lv.position_of(40)
