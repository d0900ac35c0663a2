"""An image tower for the shipped demo model's text tower: the demo CLIP that ``stablekit eval`` scores with.

The demo recipe's CLIP stage trains both towers and ships only the text one. Re-running that stage does not give
the shipped tower back bit for bit (one thread, 2026-12: 52 of its 53 tensors differ, by up to 5e-3, from the
shipped fp16 ones, presumably because the thread count, and so the float summation order, differs from the
original run's), so its image tower would be paired with a slightly different text tower. Instead this trains a
fresh image tower (the recipe's :class:`ImageTowerConfig`) and ``text_projection`` contrastively against the
shipped text tower, frozen, on the same generated data, and writes them with ``logit_scale`` as
``clip-image.safetensors`` (fp16, :mod:`stablekit.models.clip_image`'s names;
:func:`stablekit.weights.clip_score.load_demo_clip` reads it).

Made by ``OMP_NUM_THREADS=1 python -m stablekit.train.clip_image_tower --out /tmp/cit`` on a 2-core CPU shared with
other jobs: :class:`ImageTowerRecipe` as written, 1000 steps of 64 in 201 s of training, final logged loss 0.168 (the
recipe's own CLIP stage, both towers learning: 0.146 after 1500 steps). Held-out top-1 retrieval (512 examples of
the held-out stream, in batches of 64): image -> caption 96.5 %, caption -> image 97.9 %. The file is 253 kB. On 32
centred demo shapes, the true caption scored 95.2 on average and the caption with shape and background colours
swapped 54.6; the true one scored higher on all 32.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stablekit.atomic import replacing_file
from stablekit.demo import MODEL as PACKAGED
from stablekit.images import from_pil
from stablekit.models.clip_image import CLIPConfig, CLIPModel, ImageTowerConfig
from stablekit.text.tokenizer import tokenize
from stablekit.train.data import collate, open_dataset
from stablekit.train.demo_data import HELD_OUT_SEED, make_example, write_demo_dataset
from stablekit.train.stages import Batch, CLIPStage
from stablekit.train.trainer import TrainConfig, Trainer
from stablekit.weights.clip_score import DEMO_IMAGE_TOWER, image_tower_metadata, load_demo_clip
from stablekit.weights.detect import METADATA_KEY, config_from_json
from stablekit.weights.load import CheckpointError, read_checkpoint, write_safetensors


@dataclass(frozen=True)
class ImageTowerRecipe:
    text_from: Path = PACKAGED
    examples: int = 20_000  # the demo recipe's data (its training seed)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    train: TrainConfig = TrainConfig(
        steps=1000, batch_size=64, lr=5e-4, warmup=100, ema_decay=0.995, log_every=25, checkpoint_every=250
    )
    seed: int = 0
    held_out: int = 512  # examples from the held-out stream, scored in batches of ``train.batch_size``


class ImageTowerStage(CLIPStage):
    """The CLIP stage with the text tower loaded from ``text_from`` and frozen: only the image tower,
    ``text_projection`` and the temperature learn."""

    name = "clip-image"

    def __init__(self, text_from: str | Path, image: ImageTowerConfig) -> None:
        ckpt = read_checkpoint(text_from)
        assert ckpt.tensors is not None
        if METADATA_KEY not in ckpt.metadata:
            raise CheckpointError(f"{text_from}: no stablekit config in the metadata")
        config = config_from_json(ckpt.metadata[METADATA_KEY])
        super().__init__(config, CLIPConfig(config.text, image, config.text.width))
        prefix = "cond_stage_model."
        text = {k.removeprefix(prefix): v.float() for k, v in ckpt.tensors.items() if k.startswith(prefix)}
        self.module.text.load_state_dict(text, strict=True)
        self.module.text.requires_grad_(False)

    def export(self, weights: dict[str, Tensor], out: Path, data: object) -> list[Path]:
        tower = {k: v.detach().cpu().half().contiguous() for k, v in weights.items() if not k.startswith("text.")}
        path = out / DEMO_IMAGE_TOWER.name
        write_safetensors(path, tower, image_tower_metadata(self.module.config.image))
        return [path]


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, batches: list[Batch]) -> dict[str, float]:
    """Top-1 retrieval within each batch: image -> caption and caption -> image. A retrieved caption counts
    when its text equals the true one (two examples of a batch may share a caption)."""
    hits_i2t = hits_t2i = total = 0
    for images, captions in batches:
        ids = tokenize(captions, pad_token=model.config.text.pad_token).ids
        sim = F.normalize(model.encode_image(images), dim=-1) @ F.normalize(model.encode_text(ids), dim=-1).T
        hits_i2t += sum(captions[j] == c for j, c in zip(sim.argmax(dim=1).tolist(), captions, strict=True))
        hits_t2i += sum(captions[j] == c for j, c in zip(sim.argmax(dim=0).tolist(), captions, strict=True))
        total += len(captions)
    return {"image_to_text": hits_i2t / total, "text_to_image": hits_t2i / total}


def held_out_batches(n: int, batch: int, size: int) -> list[Batch]:
    """``n`` examples from the held-out stream (no training run draws from it), in batches."""
    rng = random.Random(HELD_OUT_SEED)
    examples = [make_example(rng, size)[:2] for _ in range(n)]
    return [
        (torch.cat([from_pil(im) for im, _ in examples[i : i + batch]]), [c for _, c in examples[i : i + batch]])
        for i in range(0, n, batch)
    ]


def train_image_tower(
    out: str | Path, recipe: ImageTowerRecipe = ImageTowerRecipe(), *, install: Path | None = DEMO_IMAGE_TOWER
) -> dict[str, Any]:
    """Train the image tower under ``out`` and copy its file to ``install``; returns the report (also written)."""
    out = Path(out)
    data_dir = out / "data"
    size = recipe.image.image_size
    if not (data_dir / ".complete").exists():
        write_demo_dataset(data_dir, recipe.examples, size=size)
        (data_dir / ".complete").touch()
    data = open_dataset(data_dir, size=size)
    torch.manual_seed(recipe.seed)
    stage = ImageTowerStage(recipe.text_from, recipe.image)
    t0 = time.perf_counter()
    summary = Trainer(stage, data, recipe.train, out / stage.name, collate=collate).fit(resume=True)
    seconds = time.perf_counter() - t0
    trained = out / stage.name / DEMO_IMAGE_TOWER.name
    model = load_demo_clip(recipe.text_from, trained)
    held_out = held_out_batches(recipe.held_out, recipe.train.batch_size, size)
    report: dict[str, Any] = {
        "steps": summary.steps,
        "final_loss": summary.final_loss,
        "seconds": round(seconds, 1),
        "held_out_retrieval": retrieval_accuracy(model, held_out),
        "size_bytes": trained.stat().st_size,
        "recipe": asdict(recipe),
    }
    if install is not None:
        with replacing_file(install) as tmp:
            tmp.write_bytes(trained.read_bytes())
        report["installed"] = str(install)
    with replacing_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description="train the demo CLIP's image tower against the shipped text tower")
    p.add_argument("--out", required=True, help="run folder (data, checkpoints, report.json)")
    p.add_argument("--no-install", action="store_true", help="do not copy the result into the package")
    args = p.parse_args()
    report = train_image_tower(args.out, install=None if args.no_install else DEMO_IMAGE_TOWER)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
