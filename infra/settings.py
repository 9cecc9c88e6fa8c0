"""The one settings object: `CODESHARD_*` environment variables, overridable by CLI flags.

Credentials are never settings: S3 access uses the standard AWS chain (env vars, profile, instance
role) through boto3, and nothing here stores or prints a secret. A store or endpoint URI carrying
credentials (`s3://id:secret@…`) is refused; importing this module masks URI userinfo and AWS
secrets in every log record of the process (infra/redact.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.redact import install_log_redaction, refuse_credentials_in_uri

install_log_redaction()  # every process that runs codeshard code imports the settings
REPO_ROOT = Path(__file__).resolve().parents[1]
# Local state lives under ./.codeshard of the directory a command runs in (or CODESHARD_HOME), so an
# installed package needs no source checkout; `make demo` runs in the checkout: .codeshard/store.
HOME = Path(os.environ.get("CODESHARD_HOME") or Path.cwd() / ".codeshard").absolute()
DEFAULT_STORE = f"file://{HOME / 'store'}"


def _parse_bits(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in str(text).split(",") if str(b).strip())


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build with `Settings.load(**overrides)`; `None` overrides are ignored."""

    store: str = DEFAULT_STORE  # file:///abs/path or s3://bucket/prefix
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333 (SeaweedFS, MinIO); None = AWS
    s3_region: str = "us-east-1"
    s3_retries: int = 5  # botocore "standard" retry mode max attempts (and pyarrow's)
    store_breaker: int = 3  # consecutive failed store operations (each past its retries) before the rest fail fast; 0 = off
    runner: str = "threads"  # threads | dask
    dask_address: str | None = None  # tcp://host:8786; None with runner=dask = local cluster
    dask_workers: int = 2
    max_workers: int = 2  # concurrent shard tasks with the thread runner
    # concurrent "heavy"-tagged task runs per Prefect server (all runs, all workers); 0 = not set. 4: the
    # default 2 shard workers of two runs at once. Set only against a server that gives back a killed
    # run's slots (its repossessor frees a 60 s lease): see flows/limits.py.
    heavy_limit: int = 4
    max_shard_tasks: int = 512  # more shards than this: each extract/encode task takes a batch of shards
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int = 256  # inference batch (images or texts)
    shard_rows: int = 10_000
    code_bits: tuple[int, ...] = (8, 16, 32, 64)
    seed: int = 0
    dev_dir: str = str(HOME)  # local services' data (SeaweedFS, Prefect home)

    @classmethod
    def load(cls, **overrides: Any) -> "Settings":
        """Defaults < `CODESHARD_<FIELD>` env vars < non-None keyword overrides (CLI flags)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            env = os.environ.get(f"CODESHARD_{f.name.upper()}")
            if env is not None and env != "":
                values[f.name] = _coerce(f.name, env)
        for k, v in overrides.items():
            if v is not None:
                if k not in {f.name for f in dataclasses.fields(cls)}:
                    raise TypeError(f"unknown setting {k!r}")
                values[k] = _coerce(k, v) if isinstance(v, str) else v
        s = cls(**values)
        s.validate()
        return s

    def validate(self) -> None:
        refuse_credentials_in_uri(self.store, "store")
        refuse_credentials_in_uri(self.s3_endpoint, "s3_endpoint")
        if not (self.store.startswith("file://") or self.store.startswith("s3://")):
            raise ValueError(f"store must be file:///path or s3://bucket/prefix, got {self.store!r}")
        if self.store_breaker < 0:
            raise ValueError(f"store_breaker must be >= 0 (0: off), got {self.store_breaker}")
        if self.runner not in ("threads", "dask"):
            raise ValueError(f"runner must be 'threads' or 'dask', got {self.runner!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.heavy_limit < 0:
            raise ValueError(f"heavy_limit must be >= 0 (0: no limit), got {self.heavy_limit}")
        if self.shard_rows <= 0 or self.batch_size <= 0 or self.max_shard_tasks <= 0:
            raise ValueError("shard_rows, batch_size and max_shard_tasks must be positive")

    def torch_device(self) -> str:
        """'cuda' when asked for and torch sees a GPU, or under 'auto' when it does; else 'cpu'
        ('cuda' without a GPU falls back with one logged line: infra.devices.resolve_device)."""
        from infra.devices import resolve_device, torch_cuda

        if self.device == "auto":
            return "cuda" if torch_cuda() else "cpu"
        return resolve_device(self.device, faiss_too=False)

    def to_env(self) -> dict[str, str]:
        """`CODESHARD_*` variables that reproduce these settings in a worker process."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            out[f"CODESHARD_{f.name.upper()}"] = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    def masked(self) -> dict[str, str]:
        """Settings plus the credential sources in use, with every secret masked (for `doctor`)."""
        out = {k: str(v) for k, v in dataclasses.asdict(self).items()}
        out["aws_access_key_id"] = mask(os.environ.get("AWS_ACCESS_KEY_ID", ""))
        out["aws_secret_access_key"] = "****" if os.environ.get("AWS_SECRET_ACCESS_KEY") else "(not set)"
        out["prefect_api_url"] = os.environ.get("PREFECT_API_URL", "(ephemeral)")
        return out


def mask(value: str) -> str:
    """Show only the first 4 characters of an identifier; secrets are never shown at all."""
    return "(not set)" if not value else value[:4] + "****"


def _coerce(name: str, raw: Any) -> Any:
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    t = str(types[name])
    if name == "code_bits":
        return _parse_bits(raw)
    if t.startswith("int"):
        return int(raw)
    return raw
