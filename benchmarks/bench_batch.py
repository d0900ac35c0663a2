"""Throughput of ``stablekit batch`` against the two ways to do without it, on the built-in demo model.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch.py [--rows 16] [--batch-size 8]

1. ``stablekit batch`` over a CSV of ``--rows`` prompts, one process, at ``--batch-size`` 1 and N;
2. a loop of ``stablekit generate`` processes, one per row (interpreter, torch import and model load each time);
3. diffusers' ``StableDiffusionPipeline`` called row by row in one process, loaded from the demo model converted
   with ``stablekit convert --to diffusers`` (loading not counted).

All at the demo model's own size, steps and guidance, each row with its own seed. Prints images/s for each.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    f"a {size}{colour} {shape} on a {bg} background"
    for size in ("", "small ", "large ")
    for colour in ("red", "green", "blue")
    for shape in ("circle", "square")
    for bg in ("white", "black")
]


def stablekit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stablekit", *args], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from stablekit.config import DEMO
    from stablekit.demo import model_path

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.rows)]
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        with open(where / "rows.csv", "w", newline="") as f:
            csv.writer(f).writerows([["prompt", "seed"], *([p, i] for i, p in enumerate(prompts))])

        for size in sorted({1, args.batch_size}):
            out = str(where / f"batch{size}")
            t0 = time.perf_counter()
            stablekit("batch", str(where / "rows.csv"), "--out", out, "-q", "--batch-size", str(size))
            rates[f"stablekit batch --batch-size {size}, one process"] = args.rows / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            stablekit("generate", p, "--seed", str(i), "-o", str(where / f"generate-{i}.png"))
        rates["stablekit generate, a process per row"] = args.rows / (time.perf_counter() - t0)

        stablekit("convert", str(model_path()), str(where / "diffusers"), "--to", "diffusers")
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(where / "diffusers", safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            pipe(
                p,
                generator=torch.Generator().manual_seed(i),
                height=DEMO.default_size,
                width=DEMO.default_size,
                num_inference_steps=DEMO.default_steps,
                guidance_scale=DEMO.default_guidance,
            )
        rates["diffusers StableDiffusionPipeline, row by row"] = args.rows / (time.perf_counter() - t0)
        shutil.rmtree(where / "diffusers")
    threads = torch.get_num_threads()
    print(f"{args.rows} rows, demo model, its default size/steps/guidance, {threads} torch thread(s):")
    for name, rate in rates.items():
        print(f"  {name}: {rate:.2f} images/s")


if __name__ == "__main__":
    main()
