"""Security: weights are loaded only with `weights_only=True` and only from the configured store;
S3 credentials come from the AWS chain alone and never show up in output, logs, artifacts, stored
flow parameters, store objects or exceptions."""
from __future__ import annotations

import ast
import io
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from infra.settings import REPO_ROOT, Settings
from infra.store import StoreError, clean_error, open_store

SKIP_DIRS = {".venv", ".git", ".codeshard", "build", "dist", "node_modules", "__pycache__"}
PRODUCT = ("encoders", "infra", "tasks", "flows")


def python_files(roots=None):
    roots = [REPO_ROOT / r for r in roots] if roots else [REPO_ROOT]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if not SKIP_DIRS.intersection(path.relative_to(REPO_ROOT).parts):
                yield path


def _is_torch_load(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "load"
            and isinstance(node.value, ast.Name) and node.value.id == "torch")


# -- weights: weights_only=True, from the store only ----------------------------------------------
def test_every_torch_load_passes_weights_only_true():
    """Greps (by syntax tree, so docstrings don't count) every Python file of the repository."""
    calls, bad = 0, []
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        call_funcs = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_torch_load(node.func):
                call_funcs.add(id(node.func))
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") and \
                    any(a.name == "load" for a in node.names):
                bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: imports torch's load under another name")
        for node in ast.walk(tree):  # torch.load passed around uncalled (an alias) hides a call
            if _is_torch_load(node) and id(node) not in call_funcs:
                bad.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: torch.load used without calling it")
    assert calls >= 1 and bad == [], bad


def test_product_code_loads_weights_only_through_the_registry():
    """In encoders/infra/tasks/flows: torch.load only in infra/registry.py, fed only with bytes read
    from the store; no pickle module anywhere; numpy never loads pickles."""
    bad = []
    for path in python_files(PRODUCT):
        rel = path.relative_to(REPO_ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_torch_load(node.func) and rel != "infra/registry.py":
                bad.append(f"{rel}:{node.lineno}: torch.load outside the registry")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    bad.append(f"{rel}:{node.lineno}: imports a pickle loader")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "np":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                    bad.append(f"{rel}:{node.lineno}: np.load without allow_pickle=False")
    registry = ast.parse((REPO_ROOT / "infra" / "registry.py").read_text())
    loads = [n for n in ast.walk(registry) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "_load"]
    for call in loads:  # _load(store.read_bytes(...)): the configured store is the only source
        arg = call.args[0] if call.args else None
        if not (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "read_bytes"
                and isinstance(arg.func.value, ast.Name) and arg.func.value.id == "store"):
            bad.append(f"infra/registry.py:{call.lineno}: _load fed from something other than store.read_bytes")
    assert len(loads) >= 3 and bad == [], bad


class _Payload:
    """Pickles to a call that creates a marker file: what a malicious model.pt would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_payload_in_the_store_is_refused(local_settings, tmp_path):
    """A model.pt carrying code is refused by weights_only loading and the code never runs; the
    weights the registry loads are read from the configured store."""
    from infra import layout
    from infra.registry import load_backbone, write_card
    from tests.helpers import register_untrained_cnn

    store = open_store(local_settings)
    register_untrained_cnn(store, "good-cnn")
    before = store.read_count("models/good-cnn/model.pt")
    load_backbone(store, "good-cnn")
    assert store.read_count("models/good-cnn/model.pt") == before + 1  # read from the store

    card = register_untrained_cnn(store, "evil-cnn")
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"embed.weight": _Payload(str(marker))}, buf)
    store.write_bytes(layout.model_prefix("evil-cnn") + "model.pt", buf.getvalue())
    write_card(store, layout.model_prefix("evil-cnn"), {**card, "checksum": "0" * 16})  # a new checksum: not the cached backbone
    with pytest.raises(Exception) as e:
        load_backbone(store, "evil-cnn")
    assert "Weights only load failed" in str(e.value) or "weights_only" in str(e.value)
    assert not marker.exists()


# -- credentials ----------------------------------------------------------------------------------
def test_credentials_are_not_settings(monkeypatch):
    """No setting can hold a credential, and none is exported to workers: the AWS chain is the only
    source (env, profile, instance role), read by boto3 and handed to pyarrow in-process."""
    names = {f for f in Settings.__dataclass_fields__}
    assert not {n for n in names if any(w in n for w in ("secret", "password", "token", "credential", "access_key"))}
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.load(aws_secret_access_key="x")
    env = Settings.load(store="s3://b/p", s3_endpoint="http://127.0.0.1:1").to_env()
    assert all(k.startswith("CODESHARD_") for k in env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACANARY7Q3Z")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRETCANARY-1")
    masked = json.dumps(Settings.load().masked())
    assert "SECRETCANARY-1" not in masked and "AKIACANARY7Q3Z" not in masked and "AKIA****" in masked


@pytest.mark.s3
def test_store_uses_the_callers_credentials(seaweed, s3_settings, monkeypatch):
    """The same settings work or fail with the caller's credentials only; failures name the key and
    the cause and carry no secret."""
    assert open_store(s3_settings).check().endswith("…)")
    canary = f"CANARY-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    with pytest.raises(StoreError) as e:
        open_store(s3_settings).check()
    assert "SignatureDoesNotMatch" in str(e.value) and canary not in str(e.value)
    assert clean_error(RuntimeError(f"boom {canary}")) == "boom ****"


def _cli(args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.s3
def test_cli_output_never_shows_a_secret(prefect_server, seaweed, s3_settings):
    """`codeshard doctor` (credentials the server rejects) and `codeshard extract` (an endpoint
    nobody listens on) print one clear error, exit non-zero, and never print the secret or token."""
    from infra.seaweed import free_port

    secret, token = f"SECRETCANARY{uuid.uuid4().hex}", f"TOKENCANARY{uuid.uuid4().hex}"
    key_id = "AKIACANARY7Q3Z"
    base = {k: v for k, v in os.environ.items() if not k.startswith("CODESHARD_")}
    env = {**base, **s3_settings.to_env(), "CODESHARD_S3_RETRIES": "2", "AWS_ACCESS_KEY_ID": key_id,
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token}
    doctor = _cli(["doctor"], env)
    out = doctor.stdout + doctor.stderr
    assert doctor.returncode == 1 and "store:    FAILED:" in doctor.stdout, out
    assert "aws_secret_access_key    ****" in doctor.stdout and "AKIA****" in doctor.stdout
    dead = {**env, "CODESHARD_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    extract = _cli(["extract", "--dataset", "digits", "--model", "test-cnn"], dead)
    out2 = extract.stdout + extract.stderr
    assert extract.returncode not in (0, None) and "Traceback" not in out2, out2[-3000:]
    [line] = [ln for ln in extract.stderr.splitlines() if ln.startswith("codeshard extract: error:")]
    assert "Could not connect to the endpoint URL" in line and s3_settings.store.split("/", 3)[2] in line
    for text in (out, out2):
        assert secret not in text and token not in text and key_id not in text


@pytest.mark.s3
class _Capture(logging.Handler):
    """Every record, formatted with its traceback and raw args (Prefect's logging setup may drop
    pytest's caplog handler from the root logger, so the test keeps its own)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{self.format(record)} {record.args!r} {record.__dict__.get('exc_text') or ''}")


def test_flow_runs_keep_no_secret(prefect_server, seaweed, s3_settings):
    """Run ingest + extract (with a quarantined shard, for the error paths) with every logger at
    DEBUG: no log record, Prefect log, artifact, stored flow-run parameter or store object holds
    the secret."""
    import anyio
    import pyarrow as pa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    from flows.extract_features import extract_features
    from flows.ingest import ingest
    from infra import layout
    from infra.seaweed import DEFAULT_SECRET_KEY
    from infra.shards import table_bytes
    from tests.conftest import settings_dict
    from tests.helpers import register_untrained_cnn

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret == DEFAULT_SECRET_KEY  # the server's real secret: the runs below succeed with it
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    root, capture = logging.getLogger(), _Capture()
    level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)  # botocore's DEBUG logs show request headers: the place a key would leak
    # the CLI quiets these loggers (other tests call it in-process): open them up for this test
    quiet = {n: logging.getLogger(n).level for n in ("botocore", "urllib3", "httpx", "httpcore")}
    for n in quiet:
        logging.getLogger(n).setLevel(logging.DEBUG)
    try:
        states = [ingest("digits", shard_rows=900, settings=cfg, return_state=True)]
        register_untrained_cnn(store)
        store.write_bytes(layout.raw_key("digits", 2), table_bytes(pa.table({"id": [1], "pixels": [b"x"]})))
        states.append(extract_features("digits", "test-cnn", settings=cfg, return_state=True))
    finally:
        root.removeHandler(capture)
        root.setLevel(level)
        for n, lv in quiet.items():
            logging.getLogger(n).setLevel(lv)
    assert states[1].result()["quarantined"] and states[1].result()["done"] == 2
    run_ids = [s.state_details.flow_run_id for s in states]

    logged = "\n".join(capture.lines)
    assert len(capture.lines) > 100 and "botocore" in logged and "prefect.flow_runs" in logged
    assert secret not in logged

    async def stored():
        async with get_client() as c:
            out = []
            for rid in run_ids:
                run = await c.read_flow_run(rid)
                out.append(("parameters", json.dumps(run.parameters, default=str)))
                logs = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[rid])))
                out.append(("logs", "\n".join(lg.message for lg in logs)))
                arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[rid])))
                out.append(("artifacts", "\n".join(f"{a.description} {a.data}" for a in arts)))
            return out

    records = anyio.run(stored)
    kinds = {k for k, v in records if v.strip()}
    assert kinds == {"parameters", "logs", "artifacts"}, records
    for kind, text in records:
        assert secret not in text, kind
        if kind == "parameters":
            assert "aws" not in text.lower() and "secret" not in text.lower(), text
    for info in store.list(""):  # manifests, cards, quarantine records, shards
        assert secret.encode() not in store.read_bytes(info.key), info.key
