"""Outputs in object storage and references between workflow steps, end to end.

Real parts: moto's S3 server on 127.0.0.1 (s3_server), the file store under the test
data folder, real workers, the fake ComfyUI, a webhook receiver; a throttling TCP proxy
in front of the S3 server makes an upload slow enough to kill a worker in the middle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from emp_tasks import storage
from emp_tasks.storage.files import FileStore
from tests import test_webhooks
from tests.conftest import (
    fetch_output,
    free_port,
    headers,
    kill_9,
    stream_events,
    wait_for,
    wait_for_status,
)
from tests.fake_comfyui import PNG, FakeComfyUI, upscale
from tests.receiver import Receiver
from tests.test_workflows import create, status, wait_finished

start_webhooks = test_webhooks.start_webhooks

PNG_BASE64_START = "iVBORw0KGgo"
"""How every PNG starts in base64: no event, row or webhook may carry one."""


def s3_client(env: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=env["EMP_STORAGE_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def bucket_keys(env: dict[str, str], step_id: str) -> list[str]:
    listing = s3_client(env).list_objects_v2(Bucket="emp-test-outputs", Prefix="generated/")
    return sorted(item["Key"] for item in listing.get("Contents", []) if step_id in item["Key"])


def submit(client, service: str, payload: dict[str, Any], **fields: Any) -> str:
    body = {"service": service, "payload": payload, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    fake = Receiver(free_port()).start()
    yield fake
    fake.stop()


# --- S3 -------------------------------------------------------------------------------------


def test_images_are_stored_in_s3_and_nothing_else_carries_their_bytes(
    client, start_worker, start_webhooks, s3_server, receiver
):
    start_webhooks()
    start_worker("s3-sim", "s3-sim-1", **s3_server)
    step_id = submit(
        client,
        "s3-sim",
        {"images": 2, "width": 32, "height": 24, "seed": 7},
        webhook_url=receiver.url,
        webhook_events=["step_completed"],
    )
    step = wait_for_status(client, step_id, {"completed", "failed"})
    assert step["status"] == "completed", step["error"]
    outputs = step["result"]["outputs"]
    customer = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]
    assert [o["key"] for o in outputs] == [
        f"{customer['customer_id']}/{step_id}/1/{n}.png" for n in (0, 1)
    ]
    bodies = []
    for output in outputs:
        assert output["content_type"] == "image/png"
        assert (output["width"], output["height"]) == (32, 24)
        body = fetch_output(client, output["url"])
        assert len(body) == output["size_bytes"]
        assert hashlib.sha256(body).hexdigest() == output["sha256"]
        assert body.startswith(b"\x89PNG")
        bodies.append(body)
    assert bodies[0] != bodies[1]  # two images, not one twice
    assert bucket_keys(s3_server, step_id) == sorted("generated/" + o["key"] for o in outputs)

    assert PNG_BASE64_START not in json.dumps(step)
    wait_for(lambda: "step_completed" in [e["type"] for e in stream_events(step_id)])
    assert PNG_BASE64_START not in json.dumps(stream_events(step_id))
    (hook,) = wait_for(lambda: receiver.of_type("step_completed"), timeout_s=30)
    assert PNG_BASE64_START not in hook.body
    assert json.loads(hook.body)["data"]["result"]["outputs"] == outputs


def test_the_same_seed_makes_the_same_image(client, system):
    first = wait_for_status(
        client, submit(client, "simulation", {"images": 1, "seed": 3}), {"completed"}
    )
    again = wait_for_status(
        client, submit(client, "simulation", {"images": 1, "seed": 3}), {"completed"}
    )
    other = wait_for_status(
        client, submit(client, "simulation", {"images": 1, "seed": 4}), {"completed"}
    )
    sha = [s["result"]["outputs"][0]["sha256"] for s in (first, again, other)]
    assert sha[0] == sha[1] != sha[2]


class SlowProxy:
    """A TCP proxy that forwards uploads at `rate` bytes per second and counts them."""

    def __init__(self, target: tuple[str, int], rate: int) -> None:
        self.target = target
        self.rate = rate
        self.uploaded = 0
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                inbound, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # stopped
            outbound = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(inbound, outbound, True), daemon=True).start()
            threading.Thread(
                target=self._pipe, args=(outbound, inbound, False), daemon=True
            ).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        try:
            while True:
                data = source.recv(16 * 1024)
                if not data:
                    break
                if upload:
                    self.uploaded += len(data)
                    time.sleep(len(data) / self.rate)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for each in (source, sink):
                with contextlib.suppress(OSError):
                    each.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()


def test_a_worker_killed_mid_upload_leaves_only_the_final_attempts_outputs(
    client, start_worker, s3_server
):
    endpoint = urlsplit(s3_server["EMP_STORAGE_ENDPOINT_URL"])
    proxy = SlowProxy((endpoint.hostname, endpoint.port), rate=400_000)
    try:
        slow = {**s3_server, "EMP_STORAGE_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        doomed = start_worker("upload-sim", "upload-doomed", **slow)
        step_id = submit(client, "upload-sim", {"images": 1, "width": 700, "height": 700})
        wait_for(lambda: proxy.uploaded > 300_000, timeout_s=30)
        kill_9(doomed)
        start_worker("upload-sim", "upload-survivor", **s3_server)
        step = wait_for_status(client, step_id, {"completed", "failed"}, timeout_s=60)
    finally:
        proxy.stop()
    assert step["status"] == "completed", step["error"]
    assert step["attempts"] == 2
    (output,) = step["result"]["outputs"]
    assert output["key"].endswith(f"{step_id}/2/0.png")
    body = fetch_output(client, output["url"])
    assert hashlib.sha256(body).hexdigest() == output["sha256"]
    # The dead attempt's upload may have reached the bucket under its own number; it can
    # neither overwrite the final attempt's object nor appear in the result.
    keys = bucket_keys(s3_server, step_id)
    assert "generated/" + output["key"] in keys
    assert set(keys) <= {f"generated/{output['key'].replace('/2/', f'/{n}/')}" for n in (1, 2)}


def test_an_upload_that_fails_fails_the_attempt_as_retryable_network(client, start_worker):
    dead = {
        "EMP_STORAGE_URL": "s3://emp-test-outputs/generated",
        "EMP_STORAGE_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    start_worker("nostore-sim", "nostore-1", **dead)
    step_id = submit(client, "nostore-sim", {"images": 1}, max_retries=1)
    step = wait_for_status(client, step_id, {"completed", "failed"}, timeout_s=90)
    assert step["status"] == "failed"
    assert step["error"]["code"] == "OUTPUT_UPLOAD_FAILED"
    assert step["error"]["type"] == "network" and step["error"]["retryable"] is True
    assert step["attempts"] == 2


# --- the file store ---------------------------------------------------------------------


def test_the_file_store_serves_a_signed_output_and_refuses_a_tampered_or_expired_one(
    client, system
):
    step = wait_for_status(client, submit(client, "simulation", {"images": 1}), {"completed"})
    (output,) = step["result"]["outputs"]
    assert output["url"].startswith("http://127.0.0.1:8000/outputs/")
    body = fetch_output(client, output["url"])
    assert hashlib.sha256(body).hexdigest() == output["sha256"]
    path = urlsplit(output["url"]).path
    query = parse_qs(urlsplit(output["url"]).query)
    expires, signature = query["expires"][0], query["signature"][0]

    def get(key_path: str, expires: str, signature: str):
        return client.get(key_path, query_string={"expires": expires, "signature": signature})

    tampered = ("0" if signature[0] != "0" else "1") + signature[1:]
    for response in (
        get(path, expires, tampered),
        get(path, str(int(expires) + 1), signature),
        get(path.replace("/0.png", "/1.png"), expires, signature),
        client.get(path),
    ):
        assert response.status_code == 403
        assert response.get_json()["error"]["code"] == "FORBIDDEN"
    store = storage.get()
    assert isinstance(store, FileStore)
    past = int(time.time()) - 5
    expired = get(path, str(past), store.signature(output["key"], past))
    assert expired.status_code == 403
    fresh = int(time.time()) + 60
    assert get(path, str(fresh), store.signature(output["key"], fresh)).status_code == 200
    missing = output["key"].replace("/0.png", "/9.png")
    absent = get(f"/outputs/{missing}", str(fresh), store.signature(missing, fresh))
    assert absent.status_code == 404


def test_retention_deletes_old_outputs_of_the_file_store(tmp_path):
    store = FileStore(tmp_path, "http://127.0.0.1:8000", 60)
    import io
    import os
    from datetime import UTC, datetime, timedelta

    old = store.put("c/s/1/0.png", io.BytesIO(b"old"), "image/png")
    new = store.put("c/s/2/0.png", io.BytesIO(b"new"), "image/png")
    os.utime(store.path_of(old.key), (time.time() - 3 * 86400,) * 2)
    assert store.delete_older_than(datetime.now(UTC) - timedelta(days=1)) == 1
    assert not store.path_of(old.key).exists() and store.path_of(new.key).read_bytes() == b"new"


# --- references ---------------------------------------------------------------------------


def test_a_reference_passes_step_0s_output_url_into_step_1(client, system):
    body = create(
        client,
        [
            {"service": "simulation", "payload": {"images": 1, "seed": 11}},
            {
                "service": "simulation",
                "depends_on": [0],
                "payload": {
                    "image": "{{ steps.0.outputs.0.url }}",
                    "size": "{{steps.0.outputs.0.size_bytes}}",
                    "caption": "upscale of {{ steps.0.outputs.0.key }} ({{ steps.0.ok }})",
                    "nested": [{"sha": "{{ steps.0.outputs.0.sha256 }}"}],
                },
            },
        ],
    )
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed"
    first, second = done["steps"]
    (output,) = first["result"]["outputs"]
    resolved = {
        "image": output["url"],
        "size": output["size_bytes"],
        "caption": f"upscale of {output['key']} (true)",
        "nested": [{"sha": output["sha256"]}],
    }
    step = client.get(f"/api/steps/{second['step_id']}", headers=headers()).get_json()["step"]
    assert step["payload"] == resolved
    assert second["result"]["echo"] == resolved  # what the connector saw


def test_a_missing_reference_path_fails_the_step_with_reference_not_found(client, system):
    body = create(
        client,
        [
            {"service": "simulation", "payload": {}},
            {
                "service": "simulation",
                "depends_on": [0],
                "payload": {"x": "{{ steps.0.outputs.3.url }}"},
            },
            {"service": "simulation", "depends_on": [1], "payload": {}},
        ],
    )
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "failed"
    statuses = [s["status"] for s in done["steps"]]
    assert statuses == ["completed", "failed", "skipped"]
    error = done["steps"][1]["error"]
    assert error["code"] == "REFERENCE_NOT_FOUND"
    assert error["type"] == "validation" and error["retryable"] is False
    assert "steps.0.outputs.3.url" in error["message"]
    assert done["steps"][1]["attempts"] == 0
    types = [e["type"] for e in stream_events(step_id=body["step_ids"][1])]
    assert "step_failed" in types and "step_queued" not in types


@pytest.mark.parametrize(
    ("payload", "depends_on", "field"),
    [
        ({"x": "{{ steps.1.url }}"}, [0], "steps.2.payload.x"),
        ({"a": [{"b": "see {{ steps.0.url }}"}]}, [1], "steps.2.payload.a.0.b"),
        ({"x": "{{ steps.one.url }}"}, [0], "steps.2.payload.x"),
    ],
)
def test_a_reference_to_a_step_that_is_not_a_dependency_is_refused(
    client, payload, depends_on, field
):
    steps = [
        {"service": "simulation", "payload": {}},
        {"service": "simulation", "payload": {}},
        {"service": "simulation", "payload": payload, "depends_on": depends_on},
    ]
    response = client.post("/api/workflows", json={"name": "w", "steps": steps}, headers=headers())
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_FAILED"
    assert field in [detail["field"] for detail in error["details"]]


@pytest.fixture
def comfy() -> Iterator[FakeComfyUI]:
    fake = FakeComfyUI().start()
    yield fake
    fake.stop()


def test_a_reference_feeds_step_0s_image_to_comfyui_by_upload(client, start_worker, comfy):
    start_worker(
        "upscale-comfy", "upscale-comfy-1", connector={"kind": "comfyui", "url": comfy.url}
    )
    body = create(
        client,
        [
            {"service": "simulation", "payload": {"images": 1, "seed": 5}},
            {
                "service": "upscale-comfy",
                "depends_on": [0],
                "payload": {"workflow": upscale("{{ steps.0.outputs.0.url }}")},
            },
        ],
    )
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed", [s["error"] for s in done["steps"]]
    source = fetch_output(client, done["steps"][0]["result"]["outputs"][0]["url"])
    (name,) = comfy.uploads
    assert comfy.uploads[name] == source  # the fake received step 0's image
    (prompt,) = comfy.calls("POST", "/prompt")
    assert prompt.body["prompt"]["1"]["inputs"]["image"] == name  # and the graph names it
    (output,) = done["steps"][1]["result"]["outputs"]
    assert fetch_output(client, output["url"]) == PNG
    assert status(client, body["workflow_id"])["steps"][1]["status"] == "completed"


def test_retention_deletes_old_outputs_of_the_s3_store(s3_server, monkeypatch):
    import io
    from datetime import UTC, datetime, timedelta

    from emp_tasks.storage.s3 import S3Store

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, s3_server[name])
    store = S3Store(
        "emp-test-outputs", "retention", endpoint_url=s3_server["EMP_STORAGE_ENDPOINT_URL"]
    )
    stored = store.put("c/s/1/0.txt", io.BytesIO(b"kept until now"), "text/plain")
    assert store.key_of(stored.url) == "c/s/1/0.txt"
    with store.open(stored.key) as body:
        assert body.read() == b"kept until now"
    assert store.delete_older_than(datetime.now(UTC) - timedelta(days=1)) == 0
    assert store.delete_older_than(datetime.now(UTC) + timedelta(seconds=5)) == 1
    listing = s3_client(s3_server).list_objects_v2(Bucket="emp-test-outputs", Prefix="retention/")
    assert listing.get("KeyCount", 0) == 0
