"""Prompt adherence of the demo model: accuracy per attribute over held-out prompts at several guidance scales.

    python benchmarks/demo_adherence.py [--model PATH] [--prompts 240] [--guidance 1 3 7.5] [--json out.json]
    python benchmarks/demo_adherence.py --checkpoint runs/demo/unet/checkpoints/ckpt-00006000.pt  # mid-training

The prompts come from ``held_out_prompts`` (a seed stream no training run draws from); image ``i`` uses seed
``seed + i`` at every guidance scale. The checker is deterministic pixel analysis (``stablekit.train.adherence``),
not a learned model. Prints a Markdown table; ``--sheet`` also saves the first images of each scale as a grid.
Its first row scores the prompts' clean renders after a trip through the model's autoencoder: no UNet can beat
that row, so it tells an autoencoder fault from a UNet one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

from stablekit.demo import model_path
from stablekit.pipelines import Pipeline
from stablekit.train.adherence import ATTRIBUTES, autoencoder_images, evaluate, generate_images
from stablekit.train.demo_data import held_out_prompts


def sheet(images: list[Image.Image], labels: list[str], columns: int = 10) -> Image.Image:
    """A grid of images with a short caption under each, for looking at failures by eye."""
    w, h = images[0].size
    cell_h = h + 24
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * w * 2, rows * cell_h * 2), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * w * 2, (i // columns) * cell_h * 2
        out.paste(im.resize((w * 2, h * 2), Image.Resampling.NEAREST), (x, y))
        words = label.replace(" background", "").split()
        draw.text((x + 2, y + h * 2 + 2), " ".join(words[1:4]), fill="black")
        draw.text((x + 2, y + h * 2 + 14), " ".join(words[4:]), fill="black")
    return out


def from_checkpoint(path: Path) -> Pipeline:
    """The model a unet-stage checkpoint would export: the run's frozen text tower and autoencoder, EMA UNet."""
    import torch

    from stablekit.config import DEMO
    from stablekit.train.stages import assemble

    run = path.parent.parent.parent  # RUN/unet/checkpoints/ckpt-N.pt
    model, config = assemble(DEMO, vae=run / "vae" / "vae.safetensors", text=run / "clip" / "text.safetensors")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.model.diffusion_model.load_state_dict(state["ema"]["shadow"])
    return Pipeline(model, config, device="cpu", name=path.stem)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="default: the shipped demo model")
    ap.add_argument(
        "--checkpoint",
        help="a unet-stage training checkpoint (its EMA weights), with the run's clip/ and vae/ exports beside it",
    )
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="default: the model's")
    ap.add_argument("--sampler", help="default: the model's")
    ap.add_argument("--json", help="write the table here too")
    ap.add_argument("--sheet", help="save a grid of the first 40 images per scale to this PNG prefix")
    args = ap.parse_args()

    pipe = from_checkpoint(Path(args.checkpoint)) if args.checkpoint else Pipeline.from_file(args.model or model_path())
    pairs = held_out_prompts(args.prompts)
    prompts = [p for p, _ in pairs]
    cfg = pipe.config
    print(
        f"model {pipe.name}: {len(prompts)} held-out prompts, sampler {args.sampler or cfg.default_sampler}, "
        f"{args.steps or cfg.default_steps} steps, default guidance {cfg.default_guidance:g}\n"
    )
    attributes = [a for _, a in pairs]
    t0 = time.perf_counter()
    table: dict[str, dict[str, float]] = {"autoencoder": evaluate(autoencoder_images(pipe, attributes), attributes)}
    seconds: dict[str, float] = {"autoencoder": time.perf_counter() - t0}
    for g in args.guidance:
        t0 = time.perf_counter()
        images = generate_images(pipe, prompts, g, seed=args.seed, steps=args.steps, sampler=args.sampler)
        seconds[f"{g:g}"] = time.perf_counter() - t0
        table[f"{g:g}"] = evaluate(images, attributes)
        if args.sheet:
            sheet(images[:40], prompts[:40]).save(f"{args.sheet}-cfg{g:g}.png")
    columns = [*ATTRIBUTES, "all"]
    print("| guidance | " + " | ".join(columns) + " | s/image |")
    print("|---" * (len(columns) + 2) + "|")
    for g, row in table.items():
        cells = " | ".join(f"{100 * row[c]:.1f}%" for c in columns)
        print(f"| {g} | {cells} | {seconds[g] / len(prompts):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"prompts": len(prompts), "table": table}, indent=2))


if __name__ == "__main__":
    main()
