"""The demo x4 upscaler against PIL's bicubic and Lanczos: fidelity (PSNR) and edge sharpness on held-out shapes.

    python benchmarks/demo_upscale.py [--model PATH] [--prompts 24] [--noise-levels 0 10 20] [--steps N]
    python benchmarks/demo_upscale.py --checkpoint runs/x4/upscaler/checkpoints/ckpt-00002000.pt  # mid-training

For each held-out prompt (``held_out_prompts``, a seed stream no training run draws from) the demo generator
renders the same drawing at 256 px (the reference) and at 64 px (the input: its own 4x-supersampled Lanczos
antialiasing). The 64 px image is upscaled 4x by the demo upscaler through the pipeline API (image ``i`` uses
seed ``seed + i``), by bicubic and by Lanczos, and each result is compared with the reference:

- PSNR over the whole image, over the edge band (pixels within 2 px of an edge of the reference) and over the
  flat rest, where resampling is exact (a flat colour stays flat) and a generative model's colour errors and
  texture show;
- sharpness: RMS gradient over the reference's (1 = as sharp; below, blurred; above, ringing or noise). RMS, not
  mean: a blurred edge spreads the same total rise over more pixels, so its mean |gradient| is unchanged, but
  its squared gradient falls as 1/width;
- the autoencoder row: the reference through the upscaler's autoencoder alone, the ceiling no UNet can pass.

Prints a Markdown table (mean over prompts); ``--sheet`` saves the first prompts' results side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from stablekit.demo import upscaler_path
from stablekit.pipelines import GenerationParams, Pipeline, collect, upscale
from stablekit.train.demo_data import held_out_prompts, render

LOW, HIGH = 64, 256


def _gradient(a: np.ndarray) -> np.ndarray:
    """|∇| per pixel, the channels' squared differences summed: (H, W, 3) -> (H-1, W-1)."""
    dx = np.diff(a, axis=1)[:-1]
    dy = np.diff(a, axis=0)[:, :-1]
    return np.sqrt((dx**2 + dy**2).sum(axis=-1))


def _edge_band(ref: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels within ``radius`` of a reference edge (a gradient above 8 levels): a (H, W) mask."""
    edge = np.zeros(ref.shape[:2], dtype=bool)
    edge[:-1, :-1] = _gradient(ref) > 8
    band = edge.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            band |= np.roll(np.roll(edge, dy, axis=0), dx, axis=1)
    return band


def _psnr(err: np.ndarray) -> float:
    mse = float(np.mean(err**2))
    return 10 * np.log10(255.0**2 / mse) if mse > 0 else float("inf")


def scores(out: Image.Image, ref: Image.Image) -> dict[str, float]:
    a = np.asarray(out.convert("RGB"), dtype=np.float64)
    b = np.asarray(ref.convert("RGB"), dtype=np.float64)
    band = _edge_band(b)
    return {
        "psnr": _psnr(a - b),
        "edge_psnr": _psnr((a - b)[band]),
        "flat_psnr": _psnr((a - b)[~band]),
        "sharpness": float(np.sqrt(np.mean(_gradient(a) ** 2) / np.mean(_gradient(b) ** 2))),
    }


def from_checkpoint(path: Path) -> Pipeline:
    """The model an upscaler-stage checkpoint would export: the run's autoencoder (with the fine-tuned decoder
    once there is one), the demo text tower, the EMA UNet."""
    import torch

    from stablekit.config import DEMO_X4
    from stablekit.demo import model_path
    from stablekit.train.stages import assemble

    run = path.parent.parent.parent  # RUN/upscaler/checkpoints/ckpt-N.pt
    vae = next(f for f in (run / "decoder" / "vae.safetensors", run / "vae" / "vae.safetensors") if f.exists())
    model, config = assemble(DEMO_X4, vae=vae, text=model_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.model.diffusion_model.load_state_dict(state["ema"]["shadow"])
    return Pipeline(model, config, device="cpu", name=path.stem)


def autoencoder(pipe: Pipeline) -> Callable[[Image.Image, Image.Image, str, int], Image.Image]:
    from stablekit.images import from_pil, to_pil

    def run(low: Image.Image, ref: Image.Image, prompt: str, seed: int) -> Image.Image:
        return to_pil(pipe.decode(pipe.encode(from_pil(ref), sample=False)))[0]

    return run


def diffusion(pipe: Pipeline, level: int, args: argparse.Namespace) -> Callable[..., Image.Image]:
    def run(low: Image.Image, ref: Image.Image, prompt: str, seed: int) -> Image.Image:
        params = GenerationParams(
            prompt, steps=args.steps, guidance_scale=args.guidance, seed=seed, sampler=args.sampler
        )
        return collect(upscale(pipe, params, low, noise_level=level))[0]

    return run


def resample(method: Image.Resampling) -> Callable[..., Image.Image]:
    return lambda low, ref, prompt, seed: low.resize((HIGH, HIGH), method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="default: the shipped demo upscaler")
    ap.add_argument("--checkpoint", help="an upscaler-stage training checkpoint (its EMA weights), vae/ beside it")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--noise-levels", type=int, nargs="+", default=[0, 10, 20])
    ap.add_argument("--steps", type=int, help="default: the model's")
    ap.add_argument("--guidance", type=float, help="default: the model's")
    ap.add_argument("--sampler", help="default: the model's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the table here too")
    ap.add_argument("--sheet", help="save the first 6 prompts' results (rows: methods) to this PNG")
    args = ap.parse_args()

    pipe = (
        from_checkpoint(Path(args.checkpoint))
        if args.checkpoint
        else Pipeline.from_file(args.model or upscaler_path(), device="cpu")
    )
    cfg = pipe.config
    pairs = held_out_prompts(args.prompts)
    print(
        f"model {pipe.name}: {len(pairs)} held-out prompts, {LOW} -> {HIGH} px; sampler "
        f"{args.sampler or cfg.default_sampler}, {args.steps or cfg.default_steps} steps, guidance "
        f"{args.guidance if args.guidance is not None else cfg.default_guidance:g}\n"
    )
    methods: dict[str, Callable[..., Image.Image]] = {
        "bicubic (PIL)": resample(Image.Resampling.BICUBIC),
        "Lanczos (PIL)": resample(Image.Resampling.LANCZOS),
        "autoencoder round trip (ceiling)": autoencoder(pipe),
        **{f"demo upscaler, noise level {lv}": diffusion(pipe, lv, args) for lv in args.noise_levels},
    }
    table: dict[str, dict[str, float]] = {}
    shown: list[list[Image.Image]] = []
    for name, method in methods.items():
        rows, images = [], []
        t0 = time.perf_counter()
        for i, (prompt, attrs) in enumerate(pairs):
            low, ref = render(attrs, LOW), render(attrs, HIGH)
            out = method(low, ref, prompt, args.seed + i)
            rows.append(scores(out, ref))
            images.append(out)
        table[name] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        table[name]["s_per_image"] = (time.perf_counter() - t0) / len(pairs)
        shown.append(images[:6])
    print("| method | PSNR (dB) | edge-band PSNR | flat PSNR | sharpness (1 = reference) | s/image |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        print(
            f"| {name} | {row['psnr']:.2f} | {row['edge_psnr']:.2f} | {row['flat_psnr']:.2f} | "
            f"{row['sharpness']:.3f} | {row['s_per_image']:.2f} |"
        )
    if args.sheet:
        refs = [render(a, HIGH) for _, a in pairs[:6]]
        grid = Image.new("RGB", (HIGH * len(refs), HIGH * (len(shown) + 1)), "white")
        for r, images in enumerate([refs, *shown]):
            for c, im in enumerate(images):
                grid.paste(im, (c * HIGH, r * HIGH))
        grid.save(args.sheet)
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": len(pairs), "table": table}, indent=2))


if __name__ == "__main__":
    main()
