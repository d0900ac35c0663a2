"""``stablekit generate``: text to image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from stablekit.images import save_png
from stablekit.pipelines import DTYPES, Generated, GenerationParams, Notice, Pipeline, Progress, txt2img


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a text prompt", description=__doc__)
    p.add_argument("prompt")
    p.add_argument(
        "--model",
        "-m",
        help="checkpoint file (.safetensors/.ckpt) or diffusers folder (default: the built-in demo model, "
        'which draws prompts like "a red circle on a blue background")',
    )
    p.add_argument("--negative", "-n", default="", help="negative prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: the family's)")
    p.add_argument("--guidance", "--cfg", type=float, help="classifier-free guidance scale; on when > 1")
    p.add_argument("--seed", type=int, help="seed; image i of the run uses seed + i (default: random)")
    p.add_argument("--width", "-W", type=int, help="multiple of 8 (default: the family's size)")
    p.add_argument("--height", "-H", type=int, help="multiple of 8 (default: the family's size)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch")
    p.add_argument("--batch-count", type=int, default=1, help="number of batches")
    p.add_argument("--sampler", help="sampler name, A1111 or diffusers style (see `stablekit samplers`)")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type")
    # Each overrides one setting the sampler otherwise takes from the model's own scheduler config.
    p.add_argument("--eta", type=float, help="DDIM eta (0 = deterministic)")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="timestep spacing")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas (sigma-space samplers)")
    p.add_argument("--zero-snr", action="store_true", default=None, help="rescale betas to zero terminal SNR")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    p.add_argument("--attention-slicing", action="store_true", help="compute attention in slices to save memory")
    p.add_argument(
        "--output", "-o", default="out.png", help="PNG path; with several images, -N is added before the suffix"
    )
    p.set_defaults(run=run)


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png path, got {output!r}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    from stablekit.nn.attention import set_backend

    if args.attention_slicing:
        set_backend("sliced")
    params = GenerationParams(
        prompt=args.prompt,
        negative_prompt=args.negative,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        batch_count=args.batch_count,
        sampler=args.sampler,
        sampler_options={
            k: v
            for k, v in (
                ("eta", args.eta),
                ("timestep_spacing", args.spacing),
                ("karras", args.karras),
                ("rescale_betas_zero_snr", args.zero_snr),
            )
            if v is not None
        },
    )
    paths = output_paths(args.output, args.batch_size * args.batch_count)
    model = args.model
    if model is None:
        from stablekit.demo import model_path

        model = model_path()
        print("note: no --model given: using the built-in demo model (coloured shapes only)", file=sys.stderr)
    pipe = Pipeline.from_file(
        model,
        device=args.device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        prediction=args.prediction,
    )
    written = 0
    bar: tqdm | None = None
    for ev in txt2img(pipe, params):
        if isinstance(ev, Notice):
            print(f"note: {ev.message}", file=sys.stderr)
        elif isinstance(ev, Progress):
            if bar is None or ev.step == 1:
                if bar is not None:
                    bar.close()
                desc = f"batch {ev.batch + 1}/{params.batch_count}" if params.batch_count > 1 else "sampling"
                bar = tqdm(total=ev.total, desc=desc, unit="step", file=sys.stderr)
            bar.update(1)
        elif isinstance(ev, Generated):
            if bar is not None:
                bar.close()
                bar = None
            for image, seed, text in zip(ev.images, ev.seeds, ev.parameters, strict=True):
                path = save_png(image, paths[written], text)
                written += 1
                print(f"{path} (seed {seed})")
    return 0
