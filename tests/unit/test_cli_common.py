"""flows/cli_common.py: flags become settings overrides (unset flags stay out), comma lists parse."""
from __future__ import annotations

import argparse

import pytest

from flows.cli_common import SETTING_FLAGS, csv_list, overrides, settings_args
from infra.settings import Settings


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    settings_args(p)
    return p.parse_args(argv)


def test_only_the_flags_given_become_overrides():
    assert overrides(_parse([])) == {}
    got = overrides(_parse(["--store", "file:///tmp/s", "--max-workers", "3"]))
    assert got == {"store": "file:///tmp/s", "max_workers": 3}
    assert Settings.load(**got).max_workers == 3


def test_every_settings_flag_names_a_settings_field():
    fields = set(Settings.__dataclass_fields__)
    assert set(SETTING_FLAGS) <= fields


@pytest.mark.parametrize("text, cast, want", [
    (None, str, None), ("", str, None), ("a,b", str, ["a", "b"]), ("8,16, 32", int, [8, 16, 32]), ("a,,b", str, ["a", "b"]),
])
def test_comma_lists(text, cast, want):
    assert csv_list(text, cast) == want
