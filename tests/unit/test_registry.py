"""infra/registry.py: the model-card allow-list (pure) and named pointers on a local store."""
from __future__ import annotations

import pytest

from infra import registry as R
from infra.store import LocalStore, PreconditionFailed

GOOD = {"model_id": "m", "arch": "small-cnn", "arch_kwargs": {}, "checksum": "0123456789abcdef"}


def test_a_card_that_passes_the_allow_list_is_returned_as_is():
    assert R.check_model_card(dict(GOOD), "m") == GOOD
    assert R.check_model_card({**GOOD, "input_hw": [28, 28]}, "m")["input_hw"] == [28, 28]


@pytest.mark.parametrize("card, match", [
    ({**GOOD, "model_id": "other"}, "not this model's card"),
    ({**GOOD, "checksum": "../../weights.pt"}, "checksum must be"),
    ({**GOOD, "arch": "pickle"}, "unknown backbone arch"),
    ({**GOOD, "arch_kwargs": {"weights_path": "/tmp/x.pt"}}, "not allowed"),
    ({**GOOD, "checksum": "package"}, "load weights from a package"),
    ({**GOOD, "input_hw": [28, 0]}, "input_hw must be 2 ints"),
    ("not a dict", "not this model's card"),
])
def test_a_card_outside_the_allow_list_is_refused_naming_the_field(card, match):
    with pytest.raises(R.CardInvalid, match=match):
        R.check_model_card(card, "m")


def test_a_pointer_moves_only_from_the_etag_it_was_read_with(tmp_path):
    store = LocalStore(tmp_path)
    assert R.read_pointer(store, "digits/query-model") == (None, None)
    etag = R.move_pointer(store, "digits/query-model", {"model_id": "a"}, None)
    value, read_etag = R.read_pointer(store, "digits/query-model")
    assert value == {"model_id": "a"} and read_etag == etag
    with pytest.raises(PreconditionFailed):
        R.move_pointer(store, "digits/query-model", {"model_id": "b"}, None)  # it exists now
    R.move_pointer(store, "digits/query-model", {"model_id": "b"}, read_etag)
    with pytest.raises(PreconditionFailed):
        R.move_pointer(store, "digits/query-model", {"model_id": "c"}, read_etag)  # stale
    assert R.read_pointer(store, "digits/query-model")[0] == {"model_id": "b"}
