"""encoders/coders.py: shared coder preconditions."""
import numpy as np
import pytest

from encoders.coders import make_coder
from tests.synthetic import blob_centres, blobs


@pytest.mark.parametrize("method", ["drq", "llc", "gsl"])
def test_supervised_coders_refuse_a_single_class(method):
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{method} is supervised and needs at least 2 classes"):
        make_coder(method, bits=16).fit(x, np.full(300, -1), None)


FAST = {"drq": dict(epochs_embed=1, epochs_level0=1, epochs_all=1, codebook_size=16, levels=2, dim=8, hidden=0),
        "llc": dict(epochs_class=1, epochs_instance=1, hidden=0), "gsl": dict(epochs=1)}


@pytest.fixture(scope="module")
def fitted():
    """Every registered method, fitted on one small labelled set (4 classes, 512 rows, D=16)."""
    from encoders.coders import CODERS, _import_all

    _import_all()
    x, y = blobs(blob_centres(4, 16, 3.0), 128, seed=0, shuffle=True)
    out = {}
    for method in sorted(CODERS):
        kw = {} if method == "float" else {"bits": 8}
        try:
            coder = make_coder(method, **kw, **FAST.get(method, {}))
        except TypeError:  # a config without one of the fast settings: its defaults
            coder = make_coder(method, **kw)
        coder.fit(x, y, None)
        out[method] = coder
    return out, x


def test_optional_capabilities_are_declared_by_every_coder(fitted):
    """Callers ask the Coder interface, never probe: a PQ only from pq/opq, class columns only from
    LLC, decoded vectors only from float; every other coder answers None (or refuses decode)."""
    coders, x = fitted
    for method, coder in coders.items():
        pq = coder.product_quantizer()
        assert (pq is not None) == (method in ("pq", "opq")), method
        classes = coder.class_columns(x[:5])
        assert (classes is not None) == (method == "llc"), method
        if classes is not None:
            cls, flag = classes
            assert cls.dtype == np.int32 and flag.dtype == bool and len(cls) == len(flag) == 5
        if method == "float":
            np.testing.assert_array_equal(coder.decode(coder.encode(x[:5])), x[:5])
        else:
            with pytest.raises(NotImplementedError, match="do not decode"):
                coder.decode(coder.encode(x[:5]))


def test_query_space_is_the_space_of_the_codes_quantizer(fitted):
    """pq/opq map queries into the PQ's space (pq.d dims), DRQ into its embedding, others keep them."""
    coders, x = fitted
    for method, coder in coders.items():
        q = coder.query_space(x[:3])
        assert q.dtype == np.float32 and len(q) == 3, method
        if method in ("pq", "opq"):
            assert q.shape[1] == coder.product_quantizer().d
            np.testing.assert_array_equal(q, coder.to_pq_space(x[:3]))
        elif method == "drq":
            np.testing.assert_array_equal(q, coder.embed(x[:3]))
        else:
            np.testing.assert_array_equal(q, x[:3])
