"""The `comfyui` and `http` connectors against real fake servers: in-process, then through workers.

In-process tests call `connector.run(...)` with a StepRun, as a worker does. End-to-end
tests submit over the REST API to a real worker process whose EMP_CONNECTORS entries
point at the fakes, each test on services of its own.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from emp_tasks.connectors import comfyui
from emp_tasks.connectors.base import (
    FailureType,
    OutputFile,
    StepFailure,
    StepInterrupted,
    StepRun,
)
from emp_tasks.connectors.comfyui import ComfyUIConnector
from emp_tasks.connectors.http import HttpConnector
from emp_tasks.core.config import ConfigError
from tests.conftest import (
    ARTIFACTS,
    LEASE_S,
    RunningSystem,
    fetch_output,
    free_port,
    headers,
    process_env,
    stream_events,
    wait_for,
    wait_for_status,
    worker_status,
)
from tests.fake_comfyui import PNG, FakeComfyUI, txt2img
from tests.fake_rest import FILE_BYTES, FakeRest


@pytest.fixture
def comfy() -> Iterator[FakeComfyUI]:
    fake = FakeComfyUI().start()
    yield fake
    fake.stop()


@pytest.fixture
def rest() -> Iterator[FakeRest]:
    fake = FakeRest().start()
    yield fake
    fake.stop()


@dataclass
class Attempt:
    """One in-process attempt: what the connector reported, and a cancel switch."""

    reports: list[tuple[float, str | None, str | None]] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)  # (level, message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_report: Callable[[float, str | None, str | None], None] | None = None

    def report(self, progress: float, stage: str | None = None, message: str | None = None):
        self.reports.append((progress, stage, message))
        if self.on_report is not None:
            self.on_report(progress, stage, message)

    def run(self, connector: Any, payload: dict[str, Any], attempt: int = 1) -> Any:
        step = StepRun(
            step_id="step-test",
            service=connector.service,
            attempt=attempt,
            payload=payload,
            requirements={},
            timeout_s=60,
            customer_id="alice",
            log_sink=lambda level, message: self.logs.append((level, message)),
        )
        return connector.run(step, {}, self.report, self.cancelled.is_set)

    def run_in_thread(self, connector: Any, payload: dict[str, Any]) -> dict[str, Any]:
        """Start `run` on a thread; the returned dict gets `result` or `error` when it ends."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = self.run(connector, payload)
            except BaseException as exc:  # noqa: B036 - the test inspects what was raised
                outcome["error"] = exc

        threading.Thread(target=target, daemon=True).start()
        return outcome


def failure_of(call: Callable[[], Any]) -> StepFailure:
    with pytest.raises(StepFailure) as raised:
        call()
    return raised.value


def seeded(seed: int, **kwargs: Any) -> dict[str, Any]:
    graph = txt2img(**kwargs)
    graph["3"]["inputs"]["seed"] = seed
    return graph


# --- comfyui: results ----------------------------------------------------------------------


def test_comfyui_outputs_are_files_streamed_from_view_for_the_worker_to_store(comfy):
    result = Attempt().run(ComfyUIConnector("comfy", {"url": comfy.url}), {"workflow": txt2img()})
    (output,) = result["outputs"]
    assert isinstance(output, OutputFile)
    assert output.content_type == "image/png" and output.node_id == "9"
    with output.open() as stream:
        assert stream.read() == PNG
    (image,) = result["images"]
    assert "url" not in image and "base64" not in image
    assert comfy.calls("GET", "/view")[-1].path == "/view"


def test_comfyui_execution_messages_are_the_attempts_log(comfy):
    attempt = Attempt()
    attempt.run(ComfyUIConnector("comfy", {"url": comfy.url}), {"workflow": txt2img()})
    messages = [message for _, message in attempt.logs]
    assert (
        messages[0] == "model sd_xl_base_1.0.safetensors is not loaded yet: this attempt loads it"
    )
    assert messages[1].startswith("execution started (prompt ")
    assert "executing node 3 (KSampler)" in messages
    assert messages[-1] == "execution succeeded"
    assert {level for level, _ in attempt.logs} == {"info"}


def test_comfyui_knows_the_models_of_the_graphs_it_ran(comfy):
    connector = ComfyUIConnector("comfy", {"url": comfy.url})
    assert connector.loaded_models() == []
    loads: list[tuple[str, int | None]] = []
    first = Attempt()
    step = StepRun(
        step_id="s",
        service="comfy",
        attempt=1,
        payload={"workflow": txt2img()},
        requirements={},
        timeout_s=60,
        customer_id="alice",
        load_sink=lambda model, ms: loads.append((model, ms)),
    )
    connector.run(step, {}, first.report, first.cancelled.is_set)
    assert connector.loaded_models() == ["sd_xl_base_1.0.safetensors"]
    ((model, load_ms),) = loads
    assert model == "sd_xl_base_1.0.safetensors" and load_ms >= 0
    connector.run(step, {}, first.report, first.cancelled.is_set)
    assert loads[1] == ("sd_xl_base_1.0.safetensors", None)  # already loaded: warm


def test_comfyui_url_outputs_link_to_view_on_the_public_url(comfy):
    connector = ComfyUIConnector(
        "comfy",
        {"url": comfy.url, "public_url": "https://images.example.com/comfy/", "outputs": "url"},
    )
    result = Attempt().run(connector, {"workflow": txt2img(batch_size=2)})
    assert [image["node_id"] for image in result["images"]] == ["9", "9"]
    first = result["images"][0]
    assert first["type"] == "output"
    assert first["url"] == (
        f"https://images.example.com/comfy/view?filename={first['filename']}&subfolder=&type=output"
    )
    assert result["node_outputs"]["9"]["images"][0]["filename"] == first["filename"]
    assert "outputs" not in result
    assert comfy.history[result["prompt_id"]]["status"]["status_str"] == "success"
    direct = requests.get(first["url"].replace("https://images.example.com/comfy", comfy.url))
    assert direct.content == PNG


def test_comfyui_base64_outputs_carry_the_image_bytes(comfy):
    connector = ComfyUIConnector("comfy", {"url": comfy.url, "outputs": "base64"})
    result = Attempt().run(connector, {"workflow": txt2img()})
    (image,) = result["images"]
    assert base64.b64decode(image["base64"]) == PNG
    assert image["content_type"] == "image/png"
    assert "url" not in image


def test_comfyui_accepts_the_graph_as_payload_prompt(comfy):
    connector = ComfyUIConnector("comfy", {"url": comfy.url})
    result = Attempt().run(connector, {"prompt": txt2img()})
    assert len(result["images"]) == 1
    (submitted,) = comfy.calls("POST", "/prompt")
    assert submitted.body["prompt"] == txt2img()
    assert submitted.body["client_id"]


def test_comfyui_progress_rises_through_the_sampler_steps(comfy):
    comfy.tick_s = 0.03
    attempt = Attempt()
    attempt.run(ComfyUIConnector("comfy", {"url": comfy.url}), {"workflow": txt2img(steps=30)})
    percents = [progress for progress, _, _ in attempt.reports]
    assert percents == sorted(percents)
    assert 0 < percents[-1] < 100
    sampler = [(p, message) for p, stage, message in attempt.reports if stage == "KSampler"]
    ticks = [message for _, message in sampler if message != "KSampler"]
    assert ticks, attempt.reports
    assert all(message.startswith("KSampler ") and message.endswith("/30") for message in ticks)
    assert len(attempt.reports) < 30, "sampler ticks are throttled, not reported one by one"


def test_comfyui_cached_nodes_count_towards_progress(comfy):
    connector = ComfyUIConnector("comfy", {"url": comfy.url})
    Attempt().run(connector, {"workflow": seeded(1)})
    again = Attempt()
    again.run(connector, {"workflow": seeded(2)})
    entry = list(comfy.history.values())[-1]
    cached = dict(entry["status"]["messages"])["execution_cached"]["nodes"]
    assert set(cached) == {"4", "5", "6", "7"}
    assert again.reports[0][0] >= 4 / 7 * 100 - 0.01


# --- comfyui: failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [{}, {"workflow": []}, {"prompt": "a red fox"}, {"workflow": {"3": {"inputs": {}}}}],
)
def test_comfyui_payload_without_a_graph_is_invalid(comfy, payload):
    failure = failure_of(lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), payload))
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.VALIDATION,
        "INVALID_WORKFLOW",
        False,
    )
    assert comfy.calls("POST", "/prompt") == []


def test_comfyui_rejected_graph_is_a_validation_failure_naming_the_node(comfy):
    graph = txt2img(ckpt="missing.safetensors")
    failure = failure_of(
        lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": graph})
    )
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.VALIDATION,
        "COMFYUI_REJECTED",
        False,
    )
    assert "prompt_outputs_failed_validation" in failure.message
    assert "node 4 (CheckpointLoaderSimple)" in failure.message
    assert "missing.safetensors" in failure.message


def test_comfyui_unknown_node_class_is_rejected(comfy):
    graph = {**txt2img(), "10": {"class_type": "NoSuchNode", "inputs": {}}}
    failure = failure_of(
        lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": graph})
    )
    assert failure.code == "COMFYUI_REJECTED"
    assert "NoSuchNode" in failure.message


def test_comfyui_execution_error_is_a_permanent_service_failure(comfy):
    graph = {
        **txt2img(),
        "10": {"class_type": "FailNode", "inputs": {"exception_type": "ValueError"}},
    }
    failure = failure_of(
        lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": graph})
    )
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.SERVICE,
        "COMFYUI_EXECUTION_ERROR",
        False,
    )
    assert "node 10 (FailNode)" in failure.message
    assert "ValueError" in failure.message


def test_comfyui_execution_error_is_logged_as_an_error(comfy):
    graph = {
        **txt2img(),
        "10": {"class_type": "FailNode", "inputs": {"exception_type": "ValueError"}},
    }
    attempt = Attempt()
    with pytest.raises(StepFailure):
        attempt.run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": graph})
    level, message = attempt.logs[-1]
    assert level == "error" and "execution error" in message and "FailNode" in message


def test_comfyui_out_of_memory_is_a_retryable_resource_failure(comfy):
    oom = {"exception_type": "torch.OutOfMemoryError", "message": "Allocation on device"}
    graph = {**txt2img(), "10": {"class_type": "FailNode", "inputs": oom}}
    failure = failure_of(
        lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": graph})
    )
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.RESOURCE,
        "COMFYUI_OUT_OF_MEMORY",
        True,
    )


def test_comfyui_interrupt_by_someone_else_is_retryable(comfy):
    comfy.tick_s = 0.02
    attempt = Attempt()

    def interrupt_once(progress: float, stage: str | None, message: str | None) -> None:
        if stage == "KSampler" and not comfy.calls("POST", "/interrupt"):
            requests.post(f"{comfy.url}/interrupt", timeout=5)

    attempt.on_report = interrupt_once
    connector = ComfyUIConnector("c", {"url": comfy.url})
    failure = failure_of(lambda: attempt.run(connector, {"workflow": txt2img(steps=200)}))
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.SERVICE,
        "COMFYUI_INTERRUPTED",
        True,
    )


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [(500, FailureType.SERVICE, True), (503, FailureType.SERVICE, True)],
)
def test_comfyui_server_error_on_submit_is_retryable(comfy, status, kind, retryable):
    comfy.fail_next_prompts(status)
    failure = failure_of(
        lambda: Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img()})
    )
    assert (failure.type, failure.retryable) == (kind, retryable)
    assert str(status) in failure.message


def test_comfyui_unreachable_server_is_a_network_failure():
    connector = ComfyUIConnector("c", {"url": f"http://127.0.0.1:{free_port()}"})
    failure = failure_of(lambda: Attempt().run(connector, {"workflow": txt2img()}))
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.NETWORK,
        "COMFYUI_UNREACHABLE",
        True,
    )


# --- comfyui: cancellation and a dropped WebSocket -----------------------------------------


def test_comfyui_cancel_interrupts_the_running_prompt(comfy):
    comfy.tick_s = 0.02
    attempt = Attempt()
    outcome = attempt.run_in_thread(
        ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img(steps=1000)}
    )
    prompt_id = wait_for(lambda: comfy.running_prompt_id, timeout_s=10)
    wait_for(lambda: any(stage == "KSampler" for _, stage, _ in attempt.reports), timeout_s=10)
    attempt.cancelled.set()
    wait_for(lambda: outcome, timeout_s=10)
    assert isinstance(outcome["error"], StepInterrupted)
    assert [call.body for call in comfy.calls("POST", "/interrupt")] == [{"prompt_id": prompt_id}]
    assert [call.body for call in comfy.calls("POST", "/queue")] == [{"delete": [prompt_id]}]
    wait_for(lambda: prompt_id in comfy.history, timeout_s=10)
    messages = dict(comfy.history[prompt_id]["status"]["messages"])
    assert "execution_interrupted" in messages


def test_comfyui_cancel_of_a_queued_prompt_leaves_the_running_one_alone(comfy):
    comfy.tick_s = 0.02
    other = requests.post(
        f"{comfy.url}/prompt", json={"prompt": txt2img(steps=40), "client_id": "other"}, timeout=5
    ).json()["prompt_id"]
    wait_for(lambda: comfy.running_prompt_id == other, timeout_s=10)
    attempt = Attempt()
    outcome = attempt.run_in_thread(
        ComfyUIConnector("c", {"url": comfy.url}), {"workflow": seeded(7)}
    )
    wait_for(lambda: len(comfy.calls("POST", "/prompt")) == 2, timeout_s=10)
    attempt.cancelled.set()
    wait_for(lambda: outcome, timeout_s=10)
    assert isinstance(outcome["error"], StepInterrupted)
    assert comfy.calls("POST", "/interrupt") == []
    wait_for(lambda: other in comfy.history, timeout_s=10)
    assert comfy.history[other]["status"]["status_str"] == "success"
    assert len(comfy.history) == 1, "the cancelled prompt was dropped from the queue"


def test_comfyui_dropped_websocket_falls_back_to_polling_history(comfy):
    comfy.drop_sockets_at_step = 3
    result = Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img()})
    assert len(result["images"]) == 1
    assert comfy.calls("GET", f"/history/{result['prompt_id']}")


def test_comfyui_without_a_websocket_polls_history(comfy):
    comfy.websockets = False
    result = Attempt().run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img()})
    assert len(result["images"]) == 1
    assert comfy.calls("GET", "/ws")
    assert comfy.calls("GET", f"/history/{result['prompt_id']}")


def test_comfyui_silent_websocket_still_finishes_from_history(comfy, monkeypatch):
    monkeypatch.setattr(comfyui, "SILENCE_CHECK_S", 0.3)
    monkeypatch.setattr(comfyui, "GREETING_WAIT_S", 0.3)
    comfy.silent = True
    attempt = Attempt()
    result = attempt.run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img()})
    assert len(result["images"]) == 1
    assert not any(message.startswith("executing") for _, message in attempt.logs)


def test_comfyui_queues_the_prompt_only_once_the_server_greeted_the_socket(comfy):
    """A server slow to file a new socket under its client id loses no message."""
    comfy.register_after_s = 0.5
    attempt = Attempt()
    attempt.run(ComfyUIConnector("c", {"url": comfy.url}), {"workflow": txt2img()})
    messages = [message for _, message in attempt.logs]
    assert messages[1].startswith("execution started (prompt ")
    assert "executing node 4 (CheckpointLoaderSimple)" in messages


# --- comfyui: health and models ------------------------------------------------------------


def test_comfyui_health_reports_system_and_devices(comfy):
    health = ComfyUIConnector("c", {"url": comfy.url}).health()
    assert health["ok"] is True
    assert health["devices"][0]["type"] == "cuda"
    assert health["system"]["comfyui_version"]


def test_comfyui_health_of_an_unreachable_server_is_not_ok():
    health = ComfyUIConnector("c", {"url": f"http://127.0.0.1:{free_port()}"}).health()
    assert health["ok"] is False
    assert health["error"]


def test_comfyui_models_are_the_model_picker_options(comfy):
    assert ComfyUIConnector("c", {"url": comfy.url}).models() == [
        "4x-UltraSharp.pth",
        "detail_tweaker.safetensors",
        "sd_xl_base_1.0.safetensors",
        "sdxl_vae.safetensors",
        "v1-5-pruned-emaonly.ckpt",
    ]
    assert ComfyUIConnector("c", {"url": f"http://127.0.0.1:{free_port()}"}).models() == []


@pytest.mark.parametrize(
    "options", [{}, {"url": "127.0.0.1:8188"}, {"url": "http://x", "outputs": "files"}]
)
def test_comfyui_bad_options_fail_at_construction(options):
    with pytest.raises(ConfigError):
        ComfyUIConnector("c", options)


# --- http: sync and async ------------------------------------------------------------------


def test_http_sync_answer_is_the_result(rest):
    connector = HttpConnector("gen", {"url": f"{rest.url}/v1/generate"})
    result = Attempt().run(connector, {"prompt": "a red fox"})
    assert result["echo"] == {"prompt": "a red fox"}
    assert result["images"][0]["url"].endswith(".png")


def test_http_sync_result_field_picks_part_of_the_answer(rest):
    connector = HttpConnector(
        "gen",
        {
            "url": f"{rest.url}/v1/generate",
            "result_field": "images",
            "headers": {"X-Api-Key": "k-1"},
        },
    )
    result = Attempt().run(connector, {"prompt": "a red fox"})
    assert result[0]["url"].endswith(".png")
    assert rest.received[0].headers["X-Api-Key"] == "k-1"


def stored(result: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The files a connector handed over, read as the worker would read them."""
    files = []
    for output in result["outputs"]:
        assert isinstance(output, OutputFile)
        with output.open() as stream:
            files.append((output.content_type, stream.read()))
    return files


def test_http_binary_answer_is_the_steps_one_output(rest):
    result = Attempt().run(
        HttpConnector("gen", {"url": f"{rest.url}/v1/render"}), {"answer": "binary"}
    )
    assert stored(result) == [("image/png", FILE_BYTES)]


def test_http_outputs_named_by_url_or_base64_are_handed_over_as_files(rest):
    result = Attempt().run(HttpConnector("gen", {"url": f"{rest.url}/v1/render"}), {})
    assert stored(result) == [
        ("image/png", FILE_BYTES + b"one.png"),
        ("image/png", FILE_BYTES),
        ("image/png", FILE_BYTES + b"two.png"),
    ]
    assert result["seed"] == 5


def async_options(rest: FakeRest, **extra: Any) -> dict[str, Any]:
    return {
        "url": f"{rest.url}/v1/jobs",
        "mode": "async",
        "status_url": f"{rest.url}/v1/jobs/{{id}}",
        "cancel_url": f"{rest.url}/v1/jobs/{{id}}/cancel",
        "poll_interval_s": 0.05,
        **extra,
    }


def test_http_async_job_is_polled_to_its_result_with_progress(rest):
    attempt = Attempt()
    result = attempt.run(HttpConnector("gen", async_options(rest)), {"prompt": "fox", "steps": 8})
    assert result == {"images": [result["images"][0]], "echo": {"prompt": "fox", "steps": 8}}
    percents = [progress for progress, _, _ in attempt.reports]
    assert percents and percents == sorted(percents)
    assert {stage for _, stage, _ in attempt.reports} <= {"queued", "running"}


def test_http_async_status_polls_are_the_attempts_log(rest):
    attempt = Attempt()
    attempt.run(HttpConnector("gen", async_options(rest)), {"prompt": "fox", "steps": 4})
    messages = [message for _, message in attempt.logs]
    assert messages[0].startswith("submitted to gen: job ")
    states = [m.rsplit("= ", 1)[1] for m in messages[1:]]
    assert states[-1] == "succeeded" and len(states) == len(set(states))  # each change once


def test_http_async_fractional_progress_is_reported_in_percent(rest):
    rest.tick_s = 0.15
    attempt = Attempt()
    options = async_options(rest)
    attempt.run(HttpConnector("gen", options), {"steps": 4, "fraction": True})
    assert {progress for progress, _, _ in attempt.reports} <= {0.0, 25.0, 50.0, 75.0, 100.0}
    assert any(progress > 1 for progress, _, _ in attempt.reports)


def test_http_async_failed_job_is_a_service_failure_with_its_error(rest):
    connector = HttpConnector("gen", async_options(rest))
    failure = failure_of(lambda: Attempt().run(connector, {"fail": True, "steps": 2}))
    assert (failure.type, failure.code) == (FailureType.SERVICE, "HTTP_JOB_FAILED")
    assert "the model refused the prompt" in failure.message


def test_http_async_cancel_cancels_the_remote_job(rest):
    attempt = Attempt()
    outcome = attempt.run_in_thread(HttpConnector("gen", async_options(rest)), {"steps": 1000})
    wait_for(lambda: attempt.reports, timeout_s=10)
    attempt.cancelled.set()
    wait_for(lambda: outcome, timeout_s=10)
    assert isinstance(outcome["error"], StepInterrupted)
    (job,) = rest.jobs.values()
    assert job["status"] == "cancelled"
    assert rest.calls("POST", f"/v1/jobs/{job['id']}/cancel")


def test_http_sync_cancel_stops_waiting_for_the_answer(rest):
    attempt = Attempt()
    connector = HttpConnector("gen", {"url": f"{rest.url}/v1/generate"})
    outcome = attempt.run_in_thread(connector, {"delay_s": 30})
    wait_for(lambda: rest.calls("POST", "/v1/generate"), timeout_s=10)
    attempt.cancelled.set()
    wait_for(lambda: outcome, timeout_s=10)
    assert isinstance(outcome["error"], StepInterrupted)


# --- http: failures ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "code", "retryable"),
    [
        (400, FailureType.VALIDATION, "HTTP_REJECTED", False),
        (404, FailureType.VALIDATION, "HTTP_REJECTED", False),
        (422, FailureType.VALIDATION, "HTTP_REJECTED", False),
        (401, FailureType.AUTH, "HTTP_UNAUTHORIZED", False),
        (403, FailureType.AUTH, "HTTP_UNAUTHORIZED", False),
        (408, FailureType.RESOURCE, "HTTP_BUSY", True),
        (429, FailureType.RESOURCE, "HTTP_BUSY", True),
        (500, FailureType.SERVICE, "HTTP_ERROR", True),
        (503, FailureType.SERVICE, "HTTP_ERROR", True),
    ],
)
def test_http_error_status_is_classified(rest, status, kind, code, retryable):
    connector = HttpConnector("gen", {"url": f"{rest.url}/v1/generate"})
    failure = failure_of(lambda: Attempt().run(connector, {"status_code": status}))
    assert (failure.type, failure.code, failure.retryable) == (kind, code, retryable)
    assert f"scripted {status}" in failure.message


def test_http_missing_token_is_an_auth_failure(rest):
    rest.token = "secret"
    connector = HttpConnector("gen", {"url": f"{rest.url}/v1/generate"})
    failure = failure_of(lambda: Attempt().run(connector, {}))
    assert (failure.type, failure.retryable) == (FailureType.AUTH, False)
    authorised = HttpConnector(
        "gen", {"url": f"{rest.url}/v1/generate", "headers": {"Authorization": "Bearer secret"}}
    )
    assert Attempt().run(authorised, {"n": 1})["echo"] == {"n": 1}


def test_http_unreachable_api_is_a_network_failure():
    connector = HttpConnector("gen", {"url": f"http://127.0.0.1:{free_port()}/v1/generate"})
    failure = failure_of(lambda: Attempt().run(connector, {}))
    assert (failure.type, failure.retryable) == (FailureType.NETWORK, True)


def test_http_slow_answer_is_a_timeout_failure(rest):
    connector = HttpConnector("gen", {"url": f"{rest.url}/v1/generate", "timeout_s": 0.2})
    failure = failure_of(lambda: Attempt().run(connector, {"delay_s": 5}))
    assert (failure.type, failure.code, failure.retryable) == (
        FailureType.TIMEOUT,
        "HTTP_TIMEOUT",
        True,
    )


def test_http_health_uses_the_health_url(rest):
    assert HttpConnector("gen", {"url": rest.url, "health_url": f"{rest.url}/health"}).health()[
        "ok"
    ]
    down = HttpConnector("gen", {"url": rest.url, "health_url": f"{rest.url}/nope"}).health()
    assert down["ok"] is False
    assert HttpConnector("gen", {"url": rest.url}).health() == {"ok": True, "checked": False}


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"url": "http://x", "mode": "stream"},
        {"url": "http://x", "mode": "async"},
        {"url": "http://x", "mode": "async", "status_url": "http://x/jobs"},
        {"url": "http://x", "poll_interval_s": 0},
    ],
)
def test_http_bad_options_fail_at_construction(options):
    with pytest.raises(ConfigError):
        HttpConnector("gen", options)


# --- through a worker ----------------------------------------------------------------------
#
# One worker process serves every end-to-end service below, each test using services
# of its own (so its own queues), against fakes shared by the module: starting and
# stopping a worker per test would cost more than all the tests in this file.

E2E_WORKER = "connectors-e2e-worker"


@pytest.fixture(scope="module")
def shared_comfy() -> Iterator[FakeComfyUI]:
    fake = FakeComfyUI(tick_s=0.02).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def shared_rest() -> Iterator[FakeRest]:
    fake = FakeRest().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def connector_worker(services, system, shared_comfy, shared_rest) -> Iterator[None]:
    comfy = {"kind": "comfyui", "url": shared_comfy.url}
    generate = {"kind": "http", "url": f"{shared_rest.url}/v1/generate"}
    jobs = {"kind": "http", **async_options(shared_rest)}
    entries = {
        "comfy-e2e": comfy,
        "comfy-b64-e2e": {**comfy, "outputs": "base64"},
        "comfy-cancel-e2e": comfy,
        "comfy-reject-e2e": comfy,
        "comfy-error-e2e": comfy,
        "rest-sync-e2e": {**generate, "result_field": "images"},
        "rest-error-e2e": generate,
        "rest-async-e2e": jobs,
        "rest-cancel-e2e": jobs,
    }
    env = process_env(
        services,
        EMP_WORKER_SERVICES=",".join(entries),
        EMP_CONNECTORS=json.dumps(entries),
        EMP_WORKER_ID=E2E_WORKER,
        EMP_MACHINE_ID=f"machine-{E2E_WORKER}",
        EMP_WORKER_CONCURRENCY="2",
        EMP_LEASE_TIMEOUT_S=LEASE_S,
    )
    running = RunningSystem(["worker"], env, ARTIFACTS / f"worker-{E2E_WORKER}.log")
    try:
        wait_for(lambda: worker_status(E2E_WORKER) == "online", timeout_s=60, interval_s=0.1)
        yield
    finally:
        running.stop()


def submit(client, service: str, payload: dict[str, Any]) -> str:
    body = {"service": service, "payload": payload}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


def finished(client, step_id: str) -> dict[str, Any]:
    return wait_for_status(client, step_id, {"completed", "failed", "cancelled"})


def event_types(step_id: str) -> list[str]:
    return [event["type"] for event in stream_events(step_id)]


def test_worker_runs_a_comfyui_graph_with_sampler_progress(client, connector_worker, shared_comfy):
    step_id = submit(client, "comfy-e2e", {"workflow": seeded(101, steps=40)})
    step = finished(client, step_id)
    assert step["status"] == "completed", step["error"]
    (output,) = step["result"]["outputs"]
    assert output["node_id"] == "9" and output["content_type"] == "image/png"
    assert output["key"].endswith(f"/{step_id}/1/0.png")
    assert output["size_bytes"] == len(PNG)
    assert fetch_output(client, output["url"]) == PNG
    wait_for(lambda: "step_completed" in event_types(step_id))
    progress = [e["data"] for e in stream_events(step_id) if e["type"] == "step_progress"]
    percents = [data["progress"] for data in progress]
    assert percents == sorted(percents)
    assert any(data["stage"] == "KSampler" for data in progress)


def test_worker_returns_comfyui_images_as_base64(client, connector_worker):
    step = finished(client, submit(client, "comfy-b64-e2e", {"workflow": seeded(102)}))
    assert step["status"] == "completed", step["error"]
    (image,) = step["result"]["images"]
    assert base64.b64decode(image["base64"]) == PNG
    assert image["content_type"] == "image/png"


def test_cancelling_a_running_comfyui_step_interrupts_its_prompt(
    client, connector_worker, shared_comfy
):
    step_id = submit(client, "comfy-cancel-e2e", {"workflow": seeded(103, steps=5000)})
    wait_for(lambda: "step_progress" in event_types(step_id))
    prompt_id = wait_for(lambda: shared_comfy.running_prompt_id)
    response = client.post(f"/api/steps/{step_id}/cancel", json={}, headers=headers())
    assert response.get_json()["step"]["status"] == "cancelled"
    wait_for(
        lambda: (
            {"prompt_id": prompt_id} in [c.body for c in shared_comfy.calls("POST", "/interrupt")]
        )
    )
    wait_for(lambda: prompt_id in shared_comfy.history)
    assert shared_comfy.history[prompt_id]["status"]["status_str"] == "error"
    assert finished(client, step_id)["status"] == "cancelled"


def test_rejected_comfyui_graph_fails_as_validation_without_retry(client, connector_worker):
    graph = txt2img(ckpt="nope.safetensors")
    step_id = submit(client, "comfy-reject-e2e", {"workflow": graph})
    step = finished(client, step_id)
    assert (step["status"], step["attempts"]) == ("failed", 1)
    error = step["error"]
    assert (error["type"], error["code"], error["retryable"]) == (
        "validation",
        "COMFYUI_REJECTED",
        False,
    )
    assert "nope.safetensors" in error["message"]
    assert "step_retrying" not in event_types(step_id)


def test_comfyui_execution_error_fails_the_step_as_classified(client, connector_worker):
    graph = {**seeded(104), "10": {"class_type": "FailNode", "inputs": {"message": "bad tensor"}}}
    step = finished(client, submit(client, "comfy-error-e2e", {"workflow": graph}))
    assert (step["status"], step["attempts"]) == ("failed", 1)
    assert (step["error"]["type"], step["error"]["code"]) == ("service", "COMFYUI_EXECUTION_ERROR")
    assert "bad tensor" in step["error"]["message"]


def test_worker_runs_a_sync_http_step(client, connector_worker):
    step = finished(client, submit(client, "rest-sync-e2e", {"prompt": "a red fox"}))
    assert step["status"] == "completed", step["error"]
    assert step["result"][0]["url"].endswith(".png")


def test_worker_runs_an_async_http_job_with_progress(client, connector_worker):
    step_id = submit(client, "rest-async-e2e", {"prompt": "a red fox", "steps": 10})
    step = finished(client, step_id)
    assert step["status"] == "completed", step["error"]
    assert step["result"]["echo"] == {"prompt": "a red fox", "steps": 10}
    wait_for(lambda: "step_completed" in event_types(step_id))
    assert "step_progress" in event_types(step_id)


def test_http_error_status_fails_the_step_as_classified(client, connector_worker):
    step = finished(client, submit(client, "rest-error-e2e", {"status_code": 422}))
    assert (step["status"], step["attempts"]) == ("failed", 1)
    assert (step["error"]["type"], step["error"]["code"]) == ("validation", "HTTP_REJECTED")


def test_cancelling_a_running_http_job_cancels_it_remotely(client, connector_worker, shared_rest):
    known = set(shared_rest.jobs)
    step_id = submit(client, "rest-cancel-e2e", {"steps": 10000})
    wait_for_status(client, step_id, {"running"})
    (job_id,) = wait_for(lambda: set(shared_rest.jobs) - known)
    client.post(f"/api/steps/{step_id}/cancel", json={}, headers=headers())
    wait_for(lambda: shared_rest.jobs[job_id]["status"] == "cancelled")
    assert finished(client, step_id)["status"] == "cancelled"


def test_a_comfyui_worker_advertises_the_servers_models_and_gets_steps_needing_them(
    client, connector_worker
):
    worker = client.get(f"/api/workers/{E2E_WORKER}", headers=headers("admin")).get_json()
    models = worker["worker"]["capabilities"]["models"]["comfy-e2e"]
    assert "sd_xl_base_1.0.safetensors" in models and "detail_tweaker.safetensors" in models
    assert "models.comfy-e2e" in worker["worker"]["capabilities"]["discovered"]
    needs = {"models": ["sd_xl_base_1.0.safetensors"]}
    body = {"service": "comfy-e2e", "payload": {"workflow": seeded(105)}, "requirements": needs}
    answer = client.post("/api/steps", json=body, headers=headers()).get_json()
    assert answer["warnings"] == []
    assert finished(client, answer["step_id"])["status"] == "completed"
    body["requirements"] = {"models": ["flux1-dev.safetensors"]}
    missing = client.post("/api/steps", json=body, headers=headers()).get_json()
    assert missing["warnings"][0]["unmet"] == ["models flux1-dev.safetensors"]
    client.post(f"/api/steps/{missing['step_id']}/cancel", json={}, headers=headers())


def test_a_comfyui_worker_reports_its_backends_health(client, connector_worker):
    def backends() -> dict:
        answer = client.get(f"/api/workers/{E2E_WORKER}", headers=headers("admin")).get_json()
        return answer["worker"]["backends"]

    report = wait_for(backends)
    assert report["comfy-e2e"]["ok"] is True and report["comfy-e2e"]["devices"]
    assert "rest-sync-e2e" in report  # the http connector answers too (no health_url: unchecked)
