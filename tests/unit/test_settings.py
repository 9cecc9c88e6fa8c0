from __future__ import annotations

import pytest

from infra.settings import DEFAULT_STORE, Settings


def test_defaults_env_and_overrides(monkeypatch):
    monkeypatch.delenv("CODESHARD_STORE", raising=False)
    assert Settings.load().store == DEFAULT_STORE
    monkeypatch.setenv("CODESHARD_STORE", "s3://bucket/x")
    monkeypatch.setenv("CODESHARD_CODE_BITS", "16,32")
    monkeypatch.setenv("CODESHARD_BATCH_SIZE", "64")
    s = Settings.load()
    assert (s.store, s.code_bits, s.batch_size) == ("s3://bucket/x", (16, 32), 64)
    s = Settings.load(store="file:///tmp/y", batch_size=None)  # None = flag not given
    assert s.store == "file:///tmp/y" and s.batch_size == 64


def test_validation_errors():
    with pytest.raises(ValueError, match="store must be"):
        Settings.load(store="gs://x")
    with pytest.raises(ValueError, match="runner"):
        Settings.load(runner="spark")
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.load(bogus=1)
    with pytest.raises(ValueError, match="heavy_limit must be >= 0"):
        Settings.load(heavy_limit=-1)


def test_heavy_limit_from_env_and_flag(monkeypatch):
    monkeypatch.delenv("CODESHARD_HEAVY_LIMIT", raising=False)
    assert Settings.load().heavy_limit == 4  # on by default (flows/limits.py: set only where slots come back)
    monkeypatch.setenv("CODESHARD_HEAVY_LIMIT", "1")
    assert Settings.load().heavy_limit == 1 and Settings.load(heavy_limit=0).heavy_limit == 0


def test_masked_never_shows_secret(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "super-secret-value")
    text = repr(Settings.load().masked())
    assert "super-secret-value" not in text and "AKIAEXAMPLEKEY" not in text and "AKIA****" in text


def test_to_env_round_trip(monkeypatch):
    s = Settings.load(store="s3://b/p", s3_endpoint="http://127.0.0.1:1", code_bits=(8, 64))
    for k, v in s.to_env().items():
        monkeypatch.setenv(k, v)
    assert Settings.load() == s
