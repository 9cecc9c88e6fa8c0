"""Failure notifications through a real Prefect notification block: a deployed stage flow that fails
sends its failure to the block the user configured (`CODESHARD_NOTIFY_BLOCK`), here Prefect's own
`CustomWebhookNotificationBlock` saved on the test server and pointed at a webhook receiver on
loopback; a notifier that cannot be loaded does not hide the failure (run log + artifact remain)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from flows.deployed import codes_stage
from flows.notify import NOTIFY_BLOCK_ENV
from tests.integration.prefect_server import artifacts_and_logs

pytestmark = pytest.mark.usefixtures("prefect_server")


class Receiver(BaseHTTPRequestHandler):
    """Records every POST body (JSON) the webhook block sends."""
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Receiver.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def webhook():
    """A webhook receiver on loopback; yields its URL, then the list of received JSON bodies."""
    Receiver.received = []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", Receiver.received
    finally:
        server.shutdown()
        server.server_close()


def run_failing_stage(tmp_path):
    """codes-stage for a model that has no features: fails on bad parameters (not retried)."""
    state = codes_stage("digits", "no-such-model", {"itq": 16},
                        settings={"store": f"file://{tmp_path / 'store'}", "max_workers": 1}, return_state=True)
    assert state.is_failed(), state
    return state


def test_a_failed_stage_notifies_through_the_configured_block(tmp_path, webhook, monkeypatch):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, received = webhook
    CustomWebhookNotificationBlock(
        name="codeshard-test", url=url, allow_private_urls=True,
        json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("codeshard-alerts", overwrite=True)
    monkeypatch.setenv(NOTIFY_BLOCK_ENV, f"{CustomWebhookNotificationBlock.get_block_type_slug()}/codeshard-alerts")

    state = run_failing_stage(tmp_path)

    assert len(received) == 1, received
    sent = received[0]
    assert sent["subject"].startswith("codeshard: codes-stage run ") and sent["subject"].endswith(" failed")
    flow_run_id = state.state_details.flow_run_id
    assert str(flow_run_id) in sent["body"] and "no-such-model" in sent["body"]
    # the default channels are written as well
    arts, logs = artifacts_and_logs(flow_run_id, "failure notification sent")
    assert [a.key for a in arts if a.key] == ["failure-codes-stage"]
    assert any(m.startswith("failure notification sent through block custom-webhook/codeshard-alerts")
               for m in logs), logs[-10:]


def test_a_notifier_that_cannot_load_does_not_hide_the_failure(tmp_path, webhook, monkeypatch):
    _, received = webhook
    monkeypatch.setenv(NOTIFY_BLOCK_ENV, "custom-webhook/no-such-block")

    state = run_failing_stage(tmp_path)

    assert received == []
    flow_run_id = state.state_details.flow_run_id
    arts, logs = artifacts_and_logs(flow_run_id, "failure notification through block")
    keyed = [a for a in arts if a.key]
    assert [a.key for a in keyed] == ["failure-codes-stage"] and "no-such-model" in str(keyed[0].data)
    assert any(m.startswith("codeshard: codes-stage run ") for m in logs), logs[-10:]
    assert any(m.startswith("failure notification through block custom-webhook/no-such-block failed")
               for m in logs), logs[-10:]
