from __future__ import annotations

import logging

from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.limits import ensure_heavy_limit


def test_heavy_limit_is_not_set_on_a_temporary_server(caplog):
    """Without PREFECT_API_URL (a temporary server, which never gives back a killed run's slot) the
    limit is left unset, with a warning; 0 is silent."""
    with temporary_settings(updates={PREFECT_API_URL: None}), caplog.at_level(logging.WARNING):
        ensure_heavy_limit(2)
        ensure_heavy_limit(0)
    [record] = [r for r in caplog.records if r.name == "flows.limits"]
    assert "heavy_limit=2 not set: it needs a Prefect server (PREFECT_API_URL)" in record.getMessage()
