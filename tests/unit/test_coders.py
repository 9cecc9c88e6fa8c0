"""encoders/coders.py: shared coder preconditions."""
import numpy as np
import pytest

from encoders.coders import make_coder


@pytest.mark.parametrize("method", ["drq", "llc", "gsl"])
def test_supervised_coders_refuse_a_single_class(method):
    x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=f"{method} is supervised and needs at least 2 classes"):
        make_coder(method, bits=16).fit(x, np.full(300, -1), None)
