"""Ours vs diffusers, same random weights, same process: UNet step, VAE decode, a whole generation.

    .venv/bin/python benchmarks/bench_sd.py [--family sd2-base] [--repeats 3] [--threads N] [--skip-gen]

Prints seconds (median of --repeats after the first call, which is reported separately because a user's first
image pays it), the ratio ours/diffusers (below 1 means we are faster), achieved GFLOP/s (FLOPs counted once by
``torch.utils.flop_counter``) and the peak resident-memory increase during the call (sampled every 5 ms).
The generation compares our txt2img pipeline against diffusers' StableDiffusionPipeline given the same prompt
embeddings (so the tokenizer is not part of the comparison; text encoding is inside both timings).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from stablekit.config import PRESETS, ModelConfig
from stablekit.models.ldm import LatentDiffusion
from stablekit.weights.convert import fit_state_dict, from_original
from stablekit.weights.tables.text import diffusers_text_config, text_splits, text_table
from stablekit.weights.tables.unet import diffusers_unet_config, unet_table
from stablekit.weights.tables.vae import diffusers_vae_config, vae_table

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Peak RSS above the starting RSS while the block runs (a sampling thread: CPU allocations by torch are
    invisible to tracemalloc)."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = rss()
        self._stop = False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


REF_FIRST = False  # set by --ref-first
Timing = tuple[float, float, float]  # first call s, median of later calls s, peak RSS increase MiB


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    with PeakRSS() as mem, torch.inference_mode():
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return elapsed, mem.mib


def measure_pair(ours: Callable[[], object], ref: Callable[[], object], repeats: int) -> tuple[Timing, Timing]:
    """Alternate ours and the reference call by call (ABBA: who goes first swaps each round), so load from
    anything else on the machine falls on both sides alike. oneDNN caches conv kernels by shape, so the first
    call of whichever side runs second skips kernel creation: ``--ref-first`` makes diffusers pay that cost.
    Report each side's first call, the median of the rest and the largest peak."""
    runs: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
    fns = (ours, ref)
    for r in range(repeats + 1):
        order = (0, 1) if (r % 2 == 0) != REF_FIRST else (1, 0)
        for side in order:
            runs[side].append(_timed(fns[side]))

    def summary(r: list[tuple[float, float]]) -> Timing:
        later = [t for t, _ in r[1:]] or [r[0][0]]
        return r[0][0], statistics.median(later), max(m for _, m in r)

    return summary(runs[0]), summary(runs[1])


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops()


def diffusers_models(ours: LatentDiffusion, cfg: ModelConfig, size: int):  # type: ignore[no-untyped-def]
    """diffusers/transformers models holding exactly our weights (strict loads through our key tables)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**diffusers_unet_config(cfg.unet, size // cfg.vae.downsample))
    unet.load_state_dict(from_original(ours.model.diffusion_model.state_dict(), unet_table(cfg.unet)))
    vae = AutoencoderKL(**diffusers_vae_config(cfg.vae))
    vae.load_state_dict(fit_state_dict(vae, from_original(ours.first_stage_model.state_dict(), vae_table(cfg.vae))))
    text = CLIPTextModel(CLIPTextConfig(**diffusers_text_config(cfg.text)))
    encoder = ours.cond_stage_model
    state = from_original(
        encoder.state_dict(), text_table(cfg.text), text_splits(cfg.text), ignore=encoder.OPTIONAL_KEYS
    )
    # transformers 5 names the module's keys without the released files' ``text_model.`` prefix.
    text.load_state_dict(fit_state_dict(text, {k.removeprefix("text_model."): v for k, v in state.items()}))
    return unet.eval(), vae.eval(), text.eval()


def row(name: str, ours: tuple[float, float, float], ref: tuple[float, float, float], gflop: float | None) -> None:
    rate = f"{gflop / ours[1]:7.1f} / {gflop / ref[1]:7.1f} GFLOP/s" if gflop else f"{'-':>25}"
    print(
        f"{name:<34} first {ours[0]:7.3f}s / {ref[0]:7.3f}s   steady {ours[1]:7.3f}s / {ref[1]:7.3f}s  "
        f"ratio {ours[1] / ref[1]:5.2f}   {rate}   peak +{ours[2]:7.0f} / +{ref[2]:7.0f} MiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="sd2-base", choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--ref-first", action="store_true", help="diffusers runs first in round 0")
    args = ap.parse_args()
    global REF_FIRST
    REF_FIRST = args.ref_first
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.family]
    if cfg.conditioning != "txt2img":
        cfg = replace(cfg, unet=replace(cfg.unet, in_channels=4))
    first = "diffusers" if args.ref_first else "ours"
    print(
        f"torch {torch.__version__}, {args.threads} threads, family {cfg.name}, fp32, ours / diffusers "
        f"({first} runs first in round 0)"
    )
    ours = LatentDiffusion(cfg).eval()
    unet, vae, text = diffusers_models(ours, cfg, max(args.sizes))
    our_unet = ours.model.diffusion_model
    ctx = torch.randn(2, cfg.text.context_length, cfg.unet.context_dim)
    t = torch.tensor([500, 500])
    for size in args.sizes:
        x = torch.randn(2, 4, size // 8, size // 8)

        def ours_step(x: torch.Tensor = x) -> object:
            return our_unet(x, t, ctx)

        def ref_step(x: torch.Tensor = x) -> object:
            return unet(x, t, encoder_hidden_states=ctx).sample

        g = flops(ours_step) / 1e9
        row(f"UNet step {size}px, batch 2 (CFG)", *measure_pair(ours_step, ref_step, args.repeats), g)
    z = torch.randn(1, 4, 64, 64)

    def ours_dec() -> object:
        return ours.first_stage_model.decode(z)

    def ref_dec() -> object:
        return vae.decode(z).sample

    g = flops(ours_dec) / 1e9
    row("VAE decode 512px, batch 1", *measure_pair(ours_dec, ref_dec, args.repeats), g)
    if not args.skip_gen:
        bench_generation(ours, cfg, unet, vae, text, args.repeats)


def bench_generation(ours: LatentDiffusion, cfg: ModelConfig, unet, vae, text, repeats: int) -> None:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stablekit.pipelines import GenerationParams, Pipeline, generate
    from stablekit.text.tokenizer import tokenize

    pipe = Pipeline(ours, cfg, device="cpu", dtype=torch.float32, name="bench")
    ref = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon" if cfg.schedule.prediction == "eps" else "v_prediction",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    params = GenerationParams(
        "a red circle on a blue background", width=256, height=256, steps=20, guidance_scale=7.5, seed=1, sampler="ddim"
    )

    def ours_gen() -> object:
        return generate(pipe, params)

    def ref_gen() -> object:
        ids = tokenize([params.prompt, ""], pad_token=cfg.text.pad_token).ids
        emb = text(ids).last_hidden_state
        return ref(
            prompt_embeds=emb[:1],
            negative_prompt_embeds=emb[1:],
            height=256,
            width=256,
            num_inference_steps=20,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(1)],
            output_type="np",
        ).images

    reps = max(1, repeats - 2)
    row("txt2img 256px, 20 DDIM steps", *measure_pair(ours_gen, ref_gen, reps), None)


if __name__ == "__main__":
    main()
