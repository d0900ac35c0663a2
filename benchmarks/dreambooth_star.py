"""DreamBooth on the demo model: teach it a five-pointed star, a shape it never saw, as "sks".

    python benchmarks/dreambooth_star.py [--out runs/dreambooth-star] [--steps 200] [--lr 3e-4] [--json out.json]

Instance images: ``--instances`` large stars, drawn with a PIL polygon in as many colour pairs, each captioned
"a COLOUR sks shape on a COLOUR background". Two runs from the shipped demo model, alike but for the prior: one
with prior preservation (class images: the model's own samples of ``--class-images`` demo captions), one without.
Then, for the demo model and each run, on held-out colour pairs (none of the instance images' pairs): the share
of "a COLOUR sks shape on a COLOUR background" images that the adherence checker reads as a star in the right
colours; and on held-out demo prompts (``held_out_prompts``): the share with the right colour, background and
shape, which a model that drifted towards the instance images loses. Prints a Markdown table and the CPU time.
Runs resume: run it again to continue an interrupted one (delete ``--out`` to start afresh).

Measured with the defaults on this 2-core CPU (172 s of CPU time in all; training 69 s with the prior, 49 s without),
40 held-out sks colour pairs and 100 held-out demo prompts:

| model | sks star | sks star+colours | old colour | old background | old shape | old all |
|---|---|---|---|---|---|---|
| demo model | 0% | 0% | 99% | 100% | 96% | 95% |
| with prior | 90% | 88% | 99% | 100% | 81% | 79% |
| without prior | 92% | 88% | 99% | 100% | 44% | 29% |

Language drift, without the prior: the old prompts keep their colours and backgrounds but not their shapes; 19 of
the 100 images came out as stars (14 asked for circles, 5 for triangles) and 28 squares as circles. With the prior
none was a star; 10 squares and 8 triangles were read as circles. With ``--prior-loss-weight 2 --class-images 128``
the prior run kept more shapes (86%, all attributes 82%) and taught fewer stars in the right colours (82%).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from stablekit.demo import model_path
from stablekit.pipelines import Pipeline
from stablekit.train.adherence import evaluate, generate_images, render_shape, score
from stablekit.train.demo_data import COLORS, Attributes, held_out_prompts, random_attributes
from stablekit.train.dreambooth import DREAMBOOTH_TRAIN, DreamBooth, train_dreambooth

# Instance colour pairs: spread over the palette so that no colour is tied to the token.
INSTANCE_PAIRS = [
    ("red", "blue"),
    ("yellow", "purple"),
    ("white", "green"),
    ("blue", "orange"),
    ("green", "black"),
    ("orange", "white"),
    ("purple", "yellow"),
    ("black", "red"),
]
# The star's outer radius over the image side: the demo's f=8 autoencoder turns a medium star (0.2) into a blob,
# and keeps one of 0.42 (see adherence.render_shape), so the subject is a large star.
STAR_RADIUS = 0.42
CLASS_SEED = 77  # the demo captions the class images are drawn for (any stream; these are the model's own images)


def sks_prompt(color: str, background: str) -> str:
    # The demo's grammar, with "sks shape" where the shape word goes.
    return f"a {color} sks shape on a {background} background"


def write_instances(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` large stars in ``INSTANCE_PAIRS``' colours, a little off centre, each with its caption."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (color, background) in enumerate(INSTANCE_PAIRS[:n]):
        jitter = (rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02))
        star = render_shape(Attributes("star", color, background), jitter=jitter, radius=STAR_RADIUS)
        star.save(folder / f"star{i}.png")
        (folder / f"star{i}.txt").write_text(sks_prompt(color, background))


def held_out_pairs(n: int, instances: int) -> list[tuple[str, str]]:
    """``n`` colour pairs none of the instance images has, spread over the palette."""
    used = set(INSTANCE_PAIRS[:instances])
    pairs = [(c, b) for c in COLORS for b in COLORS if c != b and (c, b) not in used]
    return random.Random(5).sample(pairs, min(n, len(pairs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/dreambooth-star")
    ap.add_argument("--instances", type=int, default=6, help="instance images (at most 8)")
    ap.add_argument("--class-images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4, help="instance (and as many class) images per step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--prior-loss-weight", type=float, default=1.0)
    ap.add_argument("--train-text-encoder", action="store_true")
    ap.add_argument("--pairs", type=int, default=40, help="held-out colour pairs for the sks prompt")
    ap.add_argument("--prompts", type=int, default=100, help="held-out demo prompts")
    ap.add_argument("--guidance", type=float, help="default: the demo model's")
    ap.add_argument("--json", help="write the table here too")
    args = ap.parse_args()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = Path(args.out)
    write_instances(out / "instances", args.instances)
    rng = random.Random(CLASS_SEED)
    class_prompts = tuple(random_attributes(rng)[1] for _ in range(args.class_images))
    spec = DreamBooth(
        instance_data=out / "instances",
        prior_loss_weight=args.prior_loss_weight,
        train_text_encoder=args.train_text_encoder,
    )
    cfg = replace(
        DREAMBOOTH_TRAIN, steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=100, progress=False
    )
    runs: dict[str, Path] = {"demo model": model_path()}
    seconds: dict[str, float] = {}
    for name, run_spec in (
        ("with prior", replace(spec, class_prompts=class_prompts, num_class_images=args.class_images)),
        ("without prior", spec),
    ):
        folder = out / name.replace(" ", "-")
        resume = (folder / "checkpoints").is_dir()
        t0 = time.perf_counter()
        summary, _ = train_dreambooth(model_path(), folder, run_spec, cfg, resume=resume)
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {summary.steps} steps, final loss {summary.final_loss:.4f}, {seconds[name]:.0f} s", flush=True)
        runs[name] = folder / "model.safetensors"

    pairs = held_out_pairs(args.pairs, args.instances)
    sks = [sks_prompt(c, b) for c, b in pairs]
    want = [Attributes("star", c, b) for c, b in pairs]
    old = held_out_prompts(args.prompts)
    table: dict[str, dict[str, float]] = {}
    for name, path in runs.items():
        pipe = Pipeline.from_file(path)
        guidance = args.guidance or pipe.config.default_guidance
        scores = [score(im, a) for im, a in zip(generate_images(pipe, sks, guidance), want, strict=True)]
        old_table = evaluate(generate_images(pipe, [p for p, _ in old], guidance), [a for _, a in old])
        table[name] = {
            "sks star": sum(s["shape"] for s in scores) / len(scores),
            "sks star+colours": sum(s["shape"] and s["color"] and s["background"] for s in scores) / len(scores),
            "old colour": old_table["color"],
            "old background": old_table["background"],
            "old shape": old_table["shape"],
            "old all": old_table["all"],
        }

    columns = list(next(iter(table.values())))
    print(
        f"\n{args.instances} instance images, {args.steps} steps of {args.batch_size}, lr {args.lr:g}; "
        f"{len(sks)} held-out sks pairs, {len(old)} held-out demo prompts\n"
    )
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{100 * row[c]:.0f}%" for c in columns) + " |")
    print(
        f"\nCPU time {time.process_time() - cpu0:.0f} s, wall {time.perf_counter() - wall0:.0f} s "
        f"(training: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "seconds": seconds, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
