"""Peak memory of the x4 upscaler on a large input: 512x512 -> 2048x2048 with the full-size X4_UPSCALER
architecture (random weights: memory and time do not depend on the values), fp32 on the CPU.

The UNet runs in overlapping latent tiles (``Pipeline.unet_tile``) and the autoencoder decodes in tiles
(``Pipeline.vae_tile``), so memory is the weights plus one tile's activations. Prints the resident set size after
loading and its peak over the whole run (``ru_maxrss``), and the time per phase.

    python benchmarks/bench_upscale_memory.py [--size 512] [--steps 1] [--tile 128] [--guidance 9]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from PIL import Image

from stablekit.config import X4_UPSCALER
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Generated, GenerationParams, Pipeline, Progress, upscale


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 2**20


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="input side in pixels (output is 4x)")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--tile", type=int, default=128, help="UNet and VAE tile, in latent pixels")
    ap.add_argument("--guidance", type=float, default=9.0, help="the x4 default; > 1 doubles the UNet batch")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = Pipeline(
        LatentDiffusion(X4_UPSCALER),
        X4_UPSCALER,
        device="cpu",
        dtype=torch.float32,
        unet_tile=args.tile,
        vae_tile=args.tile,
    )
    loaded = rss_gib()
    print(f"model built: {time.perf_counter() - t0:.0f} s, RSS {loaded:.2f} GiB")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    params = GenerationParams("a photograph", steps=args.steps, guidance_scale=args.guidance, seed=0, sampler="ddim")
    t1 = time.perf_counter()
    out = None
    for ev in upscale(pipe, params, image):
        if isinstance(ev, Progress):
            print(f"step {ev.step}/{ev.total}: {time.perf_counter() - t1:.0f} s, RSS {rss_gib():.2f} GiB", flush=True)
            t2 = time.perf_counter()
        elif isinstance(ev, Generated):
            out = ev.images[0]
    assert out is not None
    print(f"decode: {time.perf_counter() - t2:.0f} s")
    print(f"input {args.size}x{args.size} -> output {out.width}x{out.height}, {args.steps} step(s), tile {args.tile}")
    print(f"RSS after loading {loaded:.2f} GiB; peak RSS {peak_gib():.2f} GiB; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
