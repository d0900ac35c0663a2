"""Engines side by side: diffusers eager, our torch engine, our OpenVINO engine at f32 and bf16.

    .venv/bin/python benchmarks/bench_engines.py [--family sd2-base] [--repeats 3] [--workdir DIR]

One run prints, on the same random weights:

1. the machine: CPU name and flags, OpenVINO's view of it, threads, and the f32 ceiling (a large matmul's rate);
2. in this process, UNet step (batch 2, as under guidance) at 256 and 512 px and VAE decode at 512 px: seconds
   (first call, then the median of --repeats), the ratio to diffusers, the largest difference from our torch
   output, and the peak RSS increase of the call. Diffusers and our torch engine alternate call by call (see
   bench_sd.py); the OpenVINO engine is loaded from the model file written here, after the eager models are freed
   (the machine cannot hold all of them at once), with its conversion and compile time;
3. a whole 256 px, 20-step DDIM image (guidance 7.5) from a fresh process each: diffusers' StableDiffusionPipeline
   on a diffusers folder of the same weights, `stablekit generate` with each engine, the OpenVINO ones with a cold
   cache and then a warm one. Wall time and the process's peak RSS (from wait4).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_sd import PeakRSS, diffusers_models

from stablekit.config import PRESETS
from stablekit.engines.openvino import OpenVINOEngine
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Pipeline
from stablekit.weights import load_model, save_model

PROMPT = "a red circle on a blue background"
Result = tuple[float, float, float, torch.Tensor]  # first call s, steady s, peak RSS increase MiB, output


def machine() -> None:
    import openvino as ov

    flags = ""
    name = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        if key.strip() == "flags":
            flags = " ".join(f for f in value.split() if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))
            break
    core = ov.Core()
    print(f"CPU: {name}, {os.cpu_count()} logical CPUs; vector flags: {flags}")
    print(f"OpenVINO {ov.__version__}: {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    print(f"f32 ceiling: a 2048x2048 matmul runs at {rate:.0f} GFLOP/s here\n")


def _call(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    with PeakRSS() as mem, torch.inference_mode():
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
    return elapsed, mem.mib, out


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> Result:
    """(first call s, median of the next ``repeats`` s, peak RSS increase MiB, the output)."""
    return timed_sides({"only": fn}, repeats)["only"]


def timed_sides(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, Result]:
    """Each side's :data:`Result`, the sides called in turn (the order reversed every round), so load from anything
    else on the machine falls on all of them alike."""
    runs: dict[str, list[tuple[float, float, torch.Tensor]]] = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name in list(fns) if r % 2 == 0 else list(reversed(fns)):
            runs[name].append(_call(fns[name]))
    return {
        name: (rs[0][0], statistics.median(t for t, _, _ in rs[1:]), max(m for _, m, _ in rs), rs[-1][2])
        for name, rs in runs.items()
    }


def line(name: str, r: Result, ref_s: float, ref_out: torch.Tensor | None) -> None:
    diff = f"{(r[3].float() - ref_out.float()).abs().max().item():.1e}" if ref_out is not None else "-"
    print(
        f"  {name:<22} first {r[0]:7.3f}s  steady {r[1]:7.3f}s  x{r[1] / ref_s:5.2f} of diffusers  "
        f"max |diff| vs torch {diff:>8}  peak +{r[2]:6.0f} MiB"
    )


def eager(model_file: Path, cfg, repeats: int, sizes: list[int]) -> dict[str, dict[str, Result]]:  # type: ignore[no-untyped-def]
    """Diffusers and our torch engine on the same weights; the models are freed when this returns."""
    ours = load_model(model_file).model
    unet, vae, _text = diffusers_models(ours, cfg, max(sizes))
    calls: dict[str, dict[str, Callable[[], torch.Tensor]]] = {}
    for s in sizes:
        x = INPUTS[s]
        calls[f"UNet step {s}px"] = {
            "diffusers": lambda x=x: unet(x, T, encoder_hidden_states=CTX[0]).sample,
            "ours torch": lambda x=x: ours.model.diffusion_model(x, T, CTX[0]),
        }
    calls["VAE decode 512px"] = {
        "diffusers": lambda: vae.decode(Z[0]).sample,
        "ours torch": lambda: ours.first_stage_model.decode(Z[0]),
    }
    # diffusers first in round 0, so its first call pays oneDNN's kernel creation for the shape (see bench_sd.py)
    return {what: timed_sides(pair, repeats) for what, pair in calls.items()}


def openvino(model_file: Path, precision: str, repeats: int, sizes: list[int], cache: Path) -> dict[str, Result]:
    t0 = time.perf_counter()
    engine = Pipeline.from_file(model_file, engine="openvino", precision=precision, cache_dir=cache).engine  # type: ignore[arg-type]
    assert isinstance(engine, OpenVINOEngine)
    converted = ", ".join(engine.info.converted) or "nothing"
    print(
        f"OpenVINO {precision}: loaded in {time.perf_counter() - t0:.1f} s (converted: {converted}; "
        f"cache entry {engine.info.cache_bytes / 2**30:.2f} GiB)"
    )
    out = {f"UNet step {s}px": timed(lambda x=INPUTS[s]: engine.unet(x, T, CTX[0], None), repeats) for s in sizes}
    out["VAE decode 512px"] = timed(lambda: engine.decode(Z[0]), repeats)
    return out


T = torch.tensor([500.0, 500.0])
INPUTS: dict[int, torch.Tensor] = {}
CTX: list[torch.Tensor] = []
Z: list[torch.Tensor] = []


def in_process(model_file: Path, cfg, repeats: int, sizes: list[int], cache: Path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    CTX.append(torch.randn(2, cfg.text.context_length, cfg.unet.context_dim))
    Z.append(torch.randn(1, cfg.vae.embed_dim, 64, 64))
    INPUTS.update({s: torch.randn(2, cfg.unet.in_channels, s // 8, s // 8) for s in sizes})
    results = eager(model_file, cfg, repeats, sizes)
    gc.collect()
    for precision in ("f32", "bf16"):
        for what, r in openvino(model_file, precision, repeats, sizes, cache).items():
            results[what][f"openvino {precision}"] = r
        gc.collect()
    print()
    for what, sides in results.items():
        print(what + (", batch 2" if what.startswith("UNet") else ", batch 1"))
        ref_s, ref_out = sides["diffusers"][1], sides["ours torch"][3]
        for name, r in sides.items():
            line(name, r, ref_s, None if name == "diffusers" else ref_out)


DIFFUSERS_SCRIPT = """
import sys, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe(sys.argv[2], height=256, width=256, num_inference_steps=20, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(sys.argv[3])
"""


def _anon(pid: int) -> int:
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("RssAnon:"):
                return int(row.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fresh_process(name: str, argv: list[str], ref: float | None) -> float:
    """Run ``argv``; print its wall time, its peak RSS (wait4) and its peak anonymous memory (polled every 20 ms).
    RSS also counts the pages of files it maps (checkpoints, the engine's cache) that the kernel can drop and
    re-read under pressure; anonymous memory is what it cannot give back."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, _anon(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{name} failed:\n{err}")
    ratio = f"x{wall / ref:5.2f} of diffusers" if ref else " " * 17
    print(
        f"  {name:<34} {wall:7.1f} s  {ratio}  peak RSS {usage.ru_maxrss / 2**20:5.2f} GiB, "
        f"anonymous {peak_anon / 2**30:5.2f} GiB"
    )
    return wall


def whole_images(model_file: Path, folder: Path, work: Path) -> None:
    print("\nA whole 256 px image, 20 DDIM steps, guidance 7.5, each from a fresh process")
    ref = fresh_process(
        "diffusers", [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), PROMPT, str(work / "diffusers.png")], None
    )
    common = ["generate", PROMPT, "-m", str(model_file), "-W", "256", "-H", "256", "--steps", "20"]
    common += ["--sampler", "ddim", "--guidance", "7.5", "--seed", "1"]
    exe = [sys.executable, "-c", "import sys; from stablekit.cli import main; sys.exit(main())"]
    fresh_process("ours, torch", [*exe, *common, "-o", str(work / "torch.png")], ref)
    cache = work / "whole-cache"
    for label, precision in (("cold cache", "f32"), ("warm cache", "f32"), ("warm cache", "bf16")):
        argv = [*exe, *common, "--engine", "openvino", "--precision", precision, "--cache-dir", str(cache)]
        fresh_process(f"ours, openvino {precision}, {label}", [*argv, "-o", str(work / f"ov-{precision}.png")], ref)
    fresh_process("ours, openvino bf16, warm again", [*argv, "-o", str(work / "ov-bf16.png")], ref)
    import numpy as np
    from PIL import Image

    base = np.asarray(Image.open(work / "torch.png"), dtype=np.int16)
    for other in ("ov-f32.png", "ov-bf16.png"):
        diff = np.abs(np.asarray(Image.open(work / other), dtype=np.int16) - base)
        print(f"  {other} vs our torch image: max {diff.max()}/255, mean {diff.mean():.2f}/255")


def first_calls(model_file: Path, cache: Path, precision: str, size: int) -> None:
    """In a fresh process loading from a warm cache: each of the first UNet calls timed on its own, to separate
    the plugin's one-time work on a new shape (weight repacking, kernel creation) from its steady step."""
    torch.manual_seed(1)
    pipe = Pipeline.from_file(model_file, engine="openvino", precision=precision, cache_dir=cache)  # type: ignore[arg-type]
    cfg = pipe.config
    x = torch.randn(2, cfg.unet.in_channels, size // 8, size // 8)
    ctx = torch.randn(2, cfg.text.context_length, cfg.unet.context_dim)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        pipe.unet(x, T, ctx)
        times.append(time.perf_counter() - t0)
    print(f"  openvino {precision}, fresh process, warm cache: UNet calls {', '.join(f'{t:.2f}' for t in times)} s")


def write_models(family: str, work: Path) -> None:
    """The same random weights as our single file and as a diffusers folder (run in a child process, so this
    process stays small: a child's peak RSS as wait4 reports it starts from its parent's size at fork)."""
    cfg = PRESETS[family]
    torch.manual_seed(0)
    model = LatentDiffusion(cfg).eval()
    save_model(model, cfg, work / "model.safetensors")
    save_model(model, cfg, work / "diffusers", layout="diffusers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", default="sd2-base", choices=sorted(PRESETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--workdir", help="where the model files go (default: a temporary folder)")
    ap.add_argument("--skip-whole", action="store_true")
    ap.add_argument("--write-models", help=argparse.SUPPRESS)
    ap.add_argument("--first-calls", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_models:
        write_models(args.family, Path(args.write_models))
        return
    if args.first_calls:
        model, cache, precision = args.first_calls
        first_calls(Path(model), Path(cache), precision, 256)
        return
    machine()
    cfg = PRESETS[args.family]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, __file__, "--family", args.family, "--write-models", str(work)], check=True)
        print(f"family {cfg.name}, random weights, fp32")
        if not args.skip_whole:
            whole_images(work / "model.safetensors", work / "diffusers", work)
        print()
        in_process(work / "model.safetensors", cfg, args.repeats, args.sizes, work / "cache")
        print("\nThe first calls after loading, 256 px (the in-process figures above are after a first call)")
        for precision in ("f32", "bf16"):
            argv = [sys.executable, __file__, "--first-calls", str(work / "model.safetensors"), str(work / "cache")]
            subprocess.run([*argv, precision], check=True)


if __name__ == "__main__":
    main()
