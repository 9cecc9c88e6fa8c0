"""A new user's first commands, run as they type them: the installed `codeshard` entry point, from a
folder with no `.codeshard/` and a PREFECT_HOME whose parent does not exist yet."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CODESHARD = str(Path(sys.executable).parent / "codeshard")


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CODESHARD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fresh_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working folder with nothing in it, and an environment without any CODESHARD_* or Prefect API
    setting: the CLI starts its own temporary Prefect server, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CODESHARD_", "PREFECT_API_URL", "PREFECT_HOME"))}
    env["PREFECT_HOME"] = str(tmp_path / "work" / ".codeshard" / "prefect")  # parent missing, as in the Makefile
    work = tmp_path / "work"
    work.mkdir()
    return work, env


def test_first_commands_in_an_empty_folder(fresh_folder):
    """ingest then ls work first time (the old CLI failed to open Prefect's database when the home's
    parent was missing), print no Prefect-home warning and no faiss loader noise, and the default
    store is ./.codeshard/store of the folder the user is in."""
    work, env = fresh_folder
    ingest = run(["ingest", "digits", "-v"], work, env)  # -v after the subcommand works too
    out = ingest.stdout + ingest.stderr
    assert ingest.returncode == 0, out[-3000:]
    assert "Failed to create the Prefect home directory" not in out
    assert "swigfaiss" not in out and "Could not load library" not in out
    assert (work / ".codeshard" / "store" / "raw" / "digits" / "part-00000.parquet").is_file()
    ls = run(["ls", "datasets"], work, env)
    assert ls.returncode == 0, ls.stderr[-2000:]
    assert "digits" in ls.stdout and "1 raw shards" in ls.stdout


def test_mistakes_are_caught_before_a_server_starts_and_create_nothing(fresh_folder):
    """A mistyped store on a read command is an error (nothing created); a bad stage, name or flag
    value fails before any Prefect server starts; --version answers."""
    work, env = fresh_folder
    typo = work / "no-such-store"
    for args in (["ls", "--store", f"file://{typo}"],
                 ["search", "--name", "x", "--id", "1", "--store", f"file://{typo}"],
                 ["backfill", "--dataset", "digits", "--shards", "0:1", "--stages", "extract,bogus"],
                 ["extract", "--dataset", "Digits/evil", "--model", "m"]):
        r = run(args, work, env, timeout=60)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "error:" in r.stderr and "temporary server" not in (r.stdout + r.stderr).lower(), (args, r.stderr)
    assert not typo.exists()
    assert run(["doctor", "--store", f"file://{typo}"], work, env).returncode == 0  # reports, creates nothing
    assert not typo.exists()
    version = run(["--version"], work, env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("codeshard ")
    bad_choice = run(["index", "build", "--dataset", "d", "--coder", "c", "--index-type", "nope"], work, env, timeout=60)
    assert bad_choice.returncode == 2 and "argument --index-type" in bad_choice.stderr
