"""``stablekit serve`` over real HTTP on loopback: the Azure ML ``/score`` schema, the job API with its event
stream, the queue (429 with Retry-After), cancellation on disconnect, batching that keeps each request's image,
and the hostile requests every route must answer with a 4xx naming the problem."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.cli import main
from stablekit.pipelines import GenerationParams, NonFiniteError, Pipeline, Progress, collect, txt2img
from stablekit.pipelines.events import Event
from stablekit.serve import ServeSettings, Service, WorkerSettings, create_app
from tests.serving import running

PROMPT = "a red circle on a blue background"
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 7.5, "seed": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def model(tiny_model_file: Path) -> Path:
    return tiny_model_file


@pytest.fixture(scope="module")
def pipe(model: Path) -> Pipeline:
    return Pipeline.from_file(model, device="cpu")


@pytest.fixture(scope="module")
def server(pipe: Pipeline) -> Iterator[tuple[str, Service]]:
    service = Service(pipe, ServeSettings(max_body_bytes=200_000, worker=WorkerSettings(max_queue=2)))
    with running(create_app(service)) as url:
        yield url, service


def _params(prompt: str | list[str], seed: int) -> GenerationParams:
    """What SETTINGS ask for, as the Python API takes it."""
    return GenerationParams(prompt, steps=3, guidance_scale=7.5, seed=seed, width=64, height=64)


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _score(url: str, data: list[object], **parameters: object) -> httpx.Response:
    body = {"input_data": {"columns": ["prompt"], "data": data, "index": list(range(len(data)))}}
    body["input_data"]["parameters"] = {**SETTINGS, **parameters}  # type: ignore[index]
    return httpx.post(f"{url}/score", json=body, timeout=60)


def _same(a: Image.Image, b: Image.Image) -> bool:
    return bool(np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))))


def test_score_answers_the_model_cards_request_in_both_data_forms(server: tuple[str, Service], pipe: Pipeline) -> None:
    url, _ = server
    want = collect(
        txt2img(
            pipe, GenerationParams([PROMPT, "a green square"], steps=3, guidance_scale=7.5, seed=3, width=64, height=64)
        )
    )
    for data in (
        [PROMPT, "a green square"],
        [{"prompt": PROMPT}, {"prompt": "a green square", "negative_prompt": ""}],
    ):
        r = _score(url, data)
        assert r.status_code == 200, r.text
        rows = r.json()
        assert [row["prompt"] for row in rows] == [PROMPT, "a green square"]
        assert all(row["nsfw_content_detected"] is None for row in rows)
        got = [_png(row["generated_image"]) for row in rows]
        assert all(_same(g, w) for g, w in zip(got, want, strict=True))
        assert "Seed: 3" in got[0].text["parameters"] and "Seed: 4" in got[1].text["parameters"]  # type: ignore[attr-defined]
    # Rows as lists in the order of columns, as Azure's pandas-split form sends them.
    body = {"input_data": {"columns": ["prompt", "negative_prompt"], "data": [[PROMPT, ""]], "parameters": SETTINGS}}
    r = httpx.post(f"{url}/score", json=body, timeout=60)
    assert r.status_code == 200 and _same(_png(r.json()[0]["generated_image"]), want[0])


def test_score_gives_the_image_generate_writes(server: tuple[str, Service], model: Path, tmp_path: Path) -> None:
    url, _ = server
    out = tmp_path / "cli.png"
    args = ["generate", PROMPT, "--model", str(model), "--steps", "3", "--guidance", "7.5", "--seed", "3"]
    assert main([*args, "-W", "64", "-H", "64", "-o", str(out)]) == 0
    served = _png(_score(url, [PROMPT]).json()[0]["generated_image"])
    cli = Image.open(out)
    assert _same(served, cli) and served.text["parameters"] == cli.text["parameters"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "input_data: Field required"),
        ({"input_data": {"data": []}}, 400, "input_data.data"),
        ({"input_data": {"data": ["x"], "parameters": {"steps": 3}}}, 400, "input_data.parameters.steps"),
        ({"input_data": {"data": [{"prompt": 3}]}}, 400, "input_data.data.0.prompt"),
        ({"input_data": {"data": ["x"], "index": [0, 1]}}, 400, "input_data.index"),
        ({"input_data": {"data": ["x"], "parameters": {"width": 65}}}, 400, "width must be a positive multiple of 8"),
        ({"input_data": {"data": ["x"], "parameters": {"num_inference_steps": 5000}}}, 400, "--max-steps"),
        ({"input_data": {"data": ["x"], "parameters": {"guidance_scale": -1}}}, 400, "guidance scale"),
        ({"input_data": {"data": ["x"], "parameters": {"seed": 2**40}}}, 400, "seed must be in"),
        ({"input_data": {"data": ["x"], "parameters": {"sampler": "nope"}}}, 400, "unknown sampler"),
        ({"input_data": {"data": ["x\u0000"]}}, 400, "NUL"),
        ({"input_data": {"data": ["x" * 300_000]}}, 413, "--max-body-bytes"),
    ],
)
def test_score_refuses_malformed_requests_naming_the_field(
    server: tuple[str, Service], body: dict[str, object], status: int, message: str
) -> None:
    url, service = server
    r = httpx.post(f"{url}/score", json=body, timeout=30)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert service.worker.queued() == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"input_data": {"data": ["x"], "parameters": {"guidance_scale": NaN}}}', "NaN is not a JSON number"),
        (b'{"input_data": {"data": ["x"], "parameters": {"guidance_scale": Infinity}}}', "Infinity"),
        (b'{"input_data": ', "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"", "empty"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_bodies_that_are_not_strict_json_are_400(server: tuple[str, Service], raw: bytes, message: str) -> None:
    url, _ = server
    r = httpx.post(f"{url}/score", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (400, 413) and message in r.json()["error"], r.text


def _gate(gate: threading.Event, calls: list[int]) -> object:
    """A runner that holds the worker until ``gate`` opens, yielding progress so cancellation can land."""

    def run(_pipe: Pipeline, _params: GenerationParams) -> Iterator[Event]:
        calls.append(1)
        while not gate.wait(0.01):
            yield Progress(0, 1, 1, torch.zeros(1), torch.zeros(1))

    return run


def _wait_until(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_a_full_queue_answers_429_at_once_and_accepted_requests_finish(server: tuple[str, Service]) -> None:
    url, service = server
    gate, calls = threading.Event(), []
    blocker = service.submit("txt2img", GenerationParams("x"), _gate(gate, calls))  # type: ignore[arg-type]
    _wait_until(lambda: calls)
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(_score(url, [PROMPT]))) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_until(lambda: service.worker.queued() == 2)  # the queue holds 2
    started = time.monotonic()
    r = _score(url, [PROMPT])
    assert r.status_code == 429 and time.monotonic() - started < 5
    assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
    gate.set()
    for t in threads:
        t.join(60)
    assert [a.status_code for a in answers] == [200, 200] and blocker.state == "done"


def test_a_client_that_disconnects_frees_its_slot(server: tuple[str, Service]) -> None:
    url, service = server
    gate, calls = threading.Event(), []
    service.submit("txt2img", GenerationParams("x"), _gate(gate, calls))  # type: ignore[arg-type]
    _wait_until(lambda: calls)
    with pytest.raises(httpx.ReadTimeout):
        _score_with_timeout = httpx.post(
            f"{url}/score", json={"input_data": {"data": [PROMPT], "parameters": SETTINGS}}, timeout=1.0
        )
        del _score_with_timeout
    _wait_until(lambda: service.worker.queued() == 0)  # noticed the disconnect, cancelled, slot free
    gate.set()
    _wait_until(lambda: not service.worker.running)


def test_jobs_stream_progress_and_images_then_done(server: tuple[str, Service], pipe: Pipeline) -> None:
    url, _ = server
    body = {"prompt": PROMPT, "steps": 3, "guidance_scale": 7.5, "seed": 5, "width": 64, "height": 64}
    r = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["event"] == "done":
                    break
    kinds = [e["event"] for e in events]
    # The stream opens with the job's state as it is now (it may have finished already), then what follows.
    assert kinds[0] in ("queued", "running", "done") and kinds[-1] == "done" and events[-1]["state"] == "done"
    final = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
    want = collect(txt2img(pipe, _params(PROMPT, seed=5)))
    assert final["state"] == "done" and final["seeds"] == [5] and _same(_png(final["images"][0]), want[0])


def test_generate_streams_each_step_and_cancel_stops_a_running_job(server: tuple[str, Service]) -> None:
    url, service = server
    body = {"prompt": PROMPT, "steps": 4, "seed": 1, "width": 64, "height": 64, "sampler": "Euler"}
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4] and [e["event"] for e in events][-2:] == ["image", "done"]
    assert _png(next(e for e in events if e["event"] == "image")["image"]).size == (64, 64)
    gate, calls = threading.Event(), []
    job = service.submit("txt2img", GenerationParams("x"), _gate(gate, calls))  # type: ignore[arg-type]
    _wait_until(lambda: calls)
    r = httpx.delete(f"{url}/v1/jobs/{job.id}", timeout=10)
    assert r.status_code == 200
    _wait_until(lambda: job.done)
    assert job.state == "cancelled" and not service.worker.running
    assert httpx.get(f"{url}/v1/jobs/nope", timeout=10).status_code == 404


def _queued_together(pipe: Pipeline, prompts: dict[int, str]) -> tuple[Service, dict[int, httpx.Response]]:
    """/score requests (seed -> prompt) queued behind a held job, so the worker sees them all at once."""
    service = Service(pipe, ServeSettings(worker=WorkerSettings(max_queue=8, max_batch_images=8)))
    gate, calls = threading.Event(), []
    answers: dict[int, httpx.Response] = {}
    with running(create_app(service)) as url:
        service.submit("txt2img", GenerationParams("x"), _gate(gate, calls))  # type: ignore[arg-type]
        _wait_until(lambda: calls)
        threads = [
            threading.Thread(target=lambda s=s, q=q: answers.__setitem__(s, _score(url, [q], seed=s)))
            for s, q in prompts.items()
        ]
        for t in threads:
            t.start()
        _wait_until(lambda: service.worker.queued() == len(prompts))
        gate.set()
        for t in threads:
            t.join(60)
    return service, answers


def _each_as_alone(pipe: Pipeline, prompts: dict[int, str], answers: dict[int, httpx.Response]) -> None:
    for s, q in prompts.items():
        got = _png(answers[s].json()[0]["generated_image"])
        want = collect(txt2img(pipe, GenerationParams(q, steps=3, guidance_scale=7.5, seed=s, width=64, height=64)))
        diff = np.abs(np.asarray(got.convert("RGB"), dtype=int) - np.asarray(want[0], dtype=int)).max()
        assert diff <= 1, (s, diff)


def _started(service: Service) -> dict[int | None, float | None]:
    return {j.params.seed: j.started for j in service.worker.jobs.values() if j.task == "txt2img" and j.outputs}


def test_batched_requests_keep_their_own_images(pipe: Pipeline) -> None:
    prompts = {s: f"shape {s}" for s in (11, 12, 13)}
    service, answers = _queued_together(pipe, prompts)
    assert len(set(_started(service).values())) == 1, "the three requests ran as one batch"
    _each_as_alone(pipe, prompts, answers)


def test_prompts_of_different_chunk_counts_do_not_share_a_batch(pipe: Pipeline) -> None:
    # A merged batch pads every prompt to the longest one's 75-token chunks, which would change the shorter
    # prompts' images: a two-chunk prompt runs in a batch of its own, the one-chunk prompts together.
    prompts = {21: "shape 21", 22: "shape 22, " + "red, " * 40, 23: "shape 23"}
    assert pipe.prompt_chunks([prompts[22]]) == 2
    service, answers = _queued_together(pipe, prompts)
    started = _started(service)
    assert started[21] == started[23] != started[22]
    _each_as_alone(pipe, prompts, answers)


def test_a_failing_request_fails_alone_and_the_server_keeps_serving(server: tuple[str, Service]) -> None:
    url, service = server

    def broken(_pipe: Pipeline, _params: GenerationParams) -> Iterator[Event]:
        raise NonFiniteError("the model produced NaN at step 1")
        yield  # a generator, as every task is

    job = service.submit("txt2img", GenerationParams("x"), broken)
    _wait_until(lambda: job.done)
    assert job.state == "failed" and job.error is not None and job.error.status == 500
    assert _score(url, [PROMPT]).status_code == 200


def test_api_key_is_required_except_for_health(pipe: Pipeline) -> None:
    service = Service(pipe, ServeSettings(api_key="s3cret"))
    with running(create_app(service)) as url:
        assert httpx.get(f"{url}/", timeout=10).status_code == 200
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        body = {"input_data": {"data": [PROMPT], "parameters": SETTINGS}}
        r = httpx.post(f"{url}/score", json=body, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        ok = httpx.post(f"{url}/score", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert ok.status_code == 200
        assert httpx.post(f"{url}/v1/jobs", json={"prompt": "x"}, timeout=10).status_code == 401
        # No CORS unless configured: a browser on another origin gets no permission.
        pre = httpx.options(
            f"{url}/score", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in pre.headers


def test_image_fields_are_decoded_never_fetched(server: tuple[str, Service]) -> None:
    url, _ = server
    base = {"task": "img2img", "prompt": "x", "steps": 2, "width": 64, "height": 64}
    cases = [
        ("http://169.254.169.254/latest/meta-data", "URLs are not fetched"),
        ("file:///etc/passwd", "URLs are not fetched"),
        ("data:text/html;base64,PGgxPmhpPC9oMT4=", "data URL of type 'text/html'"),
        ("not base64!!", "not valid base64"),
        (base64.b64encode(b"GIF89a" + bytes(100)).decode(), "inputs must be PNG, JPEG or WebP"),
    ]
    for value, message in cases:
        r = httpx.post(f"{url}/v1/jobs", json={**base, "image": value}, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"], (value, r.text)
    r = httpx.post(f"{url}/v1/jobs", json={**base}, timeout=30)
    assert r.status_code == 400 and "image: required for img2img" in r.json()["error"]


def test_previews_are_streamed_every_n_steps(server: tuple[str, Service]) -> None:
    url, _ = server
    body = {"prompt": PROMPT, "steps": 4, "seed": 1, "width": 64, "height": 64, "sampler": "Euler", "preview_every": 2}
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=60) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    previews = [e for e in events if e["event"] == "preview"]
    assert [e["step"] for e in previews] == [2, 4]
    assert all(_png(e["images"][0]).size == (64, 64) for e in previews)
    bad = httpx.post(f"{url}/v1/jobs", json={**body, "preview_every": -1}, timeout=10)
    assert bad.status_code == 400 and "preview_every" in bad.json()["error"]


def test_score_a1111_and_generate_give_one_image(server: tuple[str, Service], model: Path, tmp_path: Path) -> None:
    # The proof: the same seed and settings through each door give the same PNG pixels and infotext.
    url, _ = server
    out = tmp_path / "cli.png"
    cli = ["generate", PROMPT, "--model", str(model), "--steps", "3", "--guidance", "7.5", "--seed", "3"]
    assert main([*cli, "--sampler", "Euler a", "-W", "64", "-H", "64", "-o", str(out)]) == 0
    score = _png(_score(url, [PROMPT], sampler="Euler a").json()[0]["generated_image"])
    body = {"prompt": PROMPT, "steps": 3, "cfg_scale": 7.5, "seed": 3, "width": 64, "height": 64}
    a1111 = httpx.post(f"{url}/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a"}, timeout=60)
    assert a1111.status_code == 200, a1111.text
    sdapi = _png(a1111.json()["images"][0])
    written = Image.open(out)
    assert _same(score, written) and _same(sdapi, written)
    assert score.text["parameters"] == written.text["parameters"] == sdapi.text["parameters"]  # type: ignore[attr-defined]
