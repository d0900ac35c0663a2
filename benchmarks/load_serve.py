"""Load test for ``stablekit serve`` on the built-in demo model: throughput and latency for 1, 4 and 16 concurrent
clients with dynamic batching on and off side by side, the 429s a burst of 4x the queue's capacity gets, and a
check that every accepted request got its own seed's image (compared with the image the pipeline gives that
prompt and seed on its own).

    python benchmarks/load_serve.py [--requests 48] [--steps 10] [--queue 8]

Each configuration gets a fresh server on a free loopback port, in this process (uvicorn in a thread).
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import uvicorn
from PIL import Image

from stablekit.demo import model_path
from stablekit.pipelines import GenerationParams, Pipeline, collect, txt2img
from stablekit.serve import ServeSettings, Service, WorkerSettings, create_app

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow triangle"]


@contextmanager
def serving(service: Service) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Result:
    status: int
    seconds: float
    seed: int
    image: Image.Image | None


def _request(url: str, seed: int, steps: int) -> Result:
    prompt = PROMPTS[seed % len(PROMPTS)]
    params = {"num_inference_steps": steps, "guidance_scale": 7.5, "seed": seed}
    body = {"input_data": {"columns": ["prompt"], "data": [prompt], "index": [0], "parameters": params}}
    start = time.perf_counter()
    try:
        r = httpx.post(f"{url}/score", json=body, timeout=600)
    except httpx.HTTPError:
        return Result(0, time.perf_counter() - start, seed, None)  # no answer: counted as lost
    took = time.perf_counter() - start
    image = None
    if r.status_code == 200:
        image = Image.open(io.BytesIO(base64.b64decode(r.json()[0]["generated_image"]))).convert("RGB")
    return Result(r.status_code, took, seed, image)


def _fire(url: str, seeds: list[int], clients: int, steps: int) -> tuple[list[Result], float]:
    """``clients`` threads each sending their share of ``seeds`` back to back."""
    results: list[Result] = []
    lock = threading.Lock()

    def client(mine: list[int]) -> None:
        for seed in mine:
            res = _request(url, seed, steps)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(seeds[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def _max_diff(results: list[Result], references: dict[int, Image.Image]) -> int:
    worst = 0
    for res in results:
        if res.image is not None:
            a = np.asarray(res.image, dtype=int)
            b = np.asarray(references[res.seed], dtype=int)
            worst = max(worst, int(np.abs(a - b).max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48, help="requests per configuration")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queue", type=int, default=8, help="queue capacity for the overload run")
    args = ap.parse_args()

    pipe = Pipeline.from_file(model_path())
    burst = 4 * args.queue
    seeds = list(range(max(args.requests, burst)))
    print(f"model {pipe.name}, {pipe.config.default_size}px, {args.steps} steps, {args.requests} requests per row")
    references = {}
    for s in seeds:
        params = GenerationParams(PROMPTS[s % len(PROMPTS)], steps=args.steps, guidance_scale=7.5, seed=s)
        references[s] = collect(txt2img(pipe, params))[0].convert("RGB")

    print(f"{'batching':>8} {'clients':>7} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'errors':>6} {'max diff':>8}")
    for clients in (1, 4, 16):
        for batching in (False, True):
            worker = WorkerSettings(max_queue=max(16, clients), batching=batching, max_batch_images=8)
            with serving(Service(pipe, ServeSettings(worker=worker))) as url:
                results, wall = _fire(url, seeds[: args.requests], clients, args.steps)
            ok = [r for r in results if r.status == 200]
            lat = sorted(r.seconds for r in ok)
            p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
            print(
                f"{'on' if batching else 'off':>8} {clients:>7} {len(ok) / wall:>9.2f} {statistics.median(lat):>7.2f} "
                f"{p95:>7.2f} {len(results) - len(ok):>6} {_max_diff(ok, references):>8}"
            )

    worker = WorkerSettings(max_queue=args.queue, batching=True, max_batch_images=8)
    with serving(Service(pipe, ServeSettings(worker=worker))) as url:
        results, wall = _fire(url, seeds[:burst], burst, args.steps)
    codes = [r.status for r in results]
    ok = [r for r in results if r.status == 200]
    print(
        f"overload: {burst} requests at once on a queue of {args.queue}: {len(ok)} answered 200, "
        f"{codes.count(429)} answered 429, {len(codes) - len(ok) - codes.count(429) - codes.count(0)} other, "
        f"{codes.count(0)} lost (no answer); "
        f"max diff of the accepted images from their seeds' images: {_max_diff(ok, references)}"
    )


if __name__ == "__main__":
    main()
