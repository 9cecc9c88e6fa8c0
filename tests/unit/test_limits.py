from __future__ import annotations

import logging

from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.limits import ensure_heavy_limit


def test_heavy_limit_is_not_set_on_a_temporary_server(caplog):
    """Without PREFECT_API_URL (a temporary server, which never gives back a killed run's slot) the
    limit is left unset, said in a debug line (not a warning: that is every plain CLI run); 0 is silent."""
    with temporary_settings(updates={PREFECT_API_URL: None}), caplog.at_level(logging.DEBUG, logger="flows.limits"):
        assert ensure_heavy_limit(2) is False
        ensure_heavy_limit(0)
    [record] = [r for r in caplog.records if r.name == "flows.limits"]
    assert record.levelno == logging.DEBUG
    assert "heavy_limit=2 not set: it needs a Prefect server (PREFECT_API_URL)" in record.getMessage()


class _Settings:
    """A stand-in for the sync client's httpx client answering GET /admin/settings."""

    def __init__(self, payload):
        self.payload = payload

    def get(self, path):
        assert path == "/admin/settings"
        if isinstance(self.payload, Exception):
            raise self.payload
        return self

    def raise_for_status(self):
        return self

    def json(self):
        return self.payload


def test_a_server_whose_repossessor_is_off_is_refused():
    """The limit is set only where a killed run's slot comes back: a server whose settings turn the
    repossessor off never frees an expired lease. Unreadable settings are taken as on."""
    from types import SimpleNamespace

    from flows.limits import _server_reaps_leases

    def reaps(payload):
        return _server_reaps_leases(SimpleNamespace(_client=_Settings(payload)))

    assert reaps({"server": {"services": {"repossessor": {"enabled": True, "loop_seconds": 15}}}})
    assert not reaps({"server": {"services": {"repossessor": {"enabled": False, "loop_seconds": 15}}}})
    assert reaps(ConnectionError("settings hidden")) and reaps({"server": {}})
