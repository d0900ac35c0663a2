"""The demo model's recipe: generated shapes, then CLIP, the autoencoder and the UNet, each by the trainer.

``stablekit train demo --out DIR`` runs it end to end and writes the fp16 model the package ships. Every stage
resumes from its newest checkpoint, so an interrupted reproduction is continued by running it again. Measured on
this 2-core CPU: CLIP 2.6 min, the autoencoder 17 min, the UNet 26 min (some of it sharing the CPU).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stablekit.config import DEMO, ModelConfig
from stablekit.demo import MODEL as PACKAGED
from stablekit.models.clip_image import CLIPConfig, ImageTowerConfig
from stablekit.train.stages import CLIPStage, Stage, UNetStage, VAEStage, assemble
from stablekit.train.trainer import Summary, TrainConfig, Trainer
from stablekit.weights import load_model, save_model


@dataclass(frozen=True)
class DemoRecipe:
    config: ModelConfig = DEMO
    examples: int = 20_000
    seed: int = 0
    clip: TrainConfig = TrainConfig(
        steps=1500, batch_size=64, lr=5e-4, warmup=150, ema_decay=0.999, log_every=25, checkpoint_every=250
    )
    image_tower: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    # Adam betas as LDM's autoencoders use, and clipping: without both, a run spiked (loss 0.024 -> 0.37 at step
    # ~2800) and its EMA decoded purple as blue and green as near-black (colour right on 70% of renders). With
    # them the same run had no spike. Which of the two matters was not isolated.
    vae: TrainConfig = TrainConfig(
        steps=6000,
        batch_size=8,
        lr=2e-4,
        warmup=100,
        adam_betas=(0.5, 0.9),
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=25,
        checkpoint_every=500,
    )
    kl_weight: float = 1e-4
    unet: TrainConfig = TrainConfig(
        steps=6000,
        batch_size=32,
        lr=5e-4,
        warmup=200,
        grad_clip=1.0,
        ema_decay=0.999,
        log_every=25,
        checkpoint_every=500,
    )
    caption_dropout: float = 0.1


def _run(stage: Stage, data: Any, cfg: TrainConfig, out: Path, collate: Any) -> Summary:
    return Trainer(stage, data, cfg, out / stage.name, collate=collate).fit(resume=True)


def train_demo(
    out: str | Path, recipe: DemoRecipe = DemoRecipe(), *, install: Path | None = PACKAGED
) -> dict[str, Any]:
    """Reproduce the demo model under ``out``; copy it (fp16) to ``install``. Returns the per-stage report."""
    from stablekit.train.data import collate, open_dataset
    from stablekit.train.demo_data import write_demo_dataset

    out = Path(out)
    size = recipe.config.default_size
    data_dir = out / "data"
    t0 = time.perf_counter()
    if not (data_dir / ".complete").exists():
        write_demo_dataset(data_dir, recipe.examples, size=size)  # the fixed training seed
        (data_dir / ".complete").touch()
    data = open_dataset(data_dir, size=size)
    report: dict[str, Any] = {"data_seconds": round(time.perf_counter() - t0, 1), "examples": len(data)}

    def logged_seconds(log: Path) -> float:
        rows = log.read_text().splitlines()
        return float(json.loads(rows[-1])["time"]) if rows else 0.0

    def stage_report(name: str, s: Summary) -> dict[str, Any]:
        return {
            "steps": s.steps,
            "final_loss": s.final_loss,
            "seconds": round(logged_seconds(out / name / "log.jsonl"), 1),  # over every resumed run
            "resumed_from": s.resumed_from,
        }

    torch.manual_seed(recipe.seed)
    clip = CLIPStage(recipe.config, CLIPConfig(recipe.config.text, recipe.image_tower, recipe.config.text.width))
    report["clip"] = stage_report("clip", _run(clip, data, recipe.clip, out, collate))
    torch.manual_seed(recipe.seed)
    vae = VAEStage(recipe.config, kl_weight=recipe.kl_weight)
    report["vae"] = stage_report("vae", _run(vae, data, recipe.vae, out, collate))
    torch.manual_seed(recipe.seed)
    model, config = assemble(recipe.config, vae=out / "vae" / "vae.safetensors", text=out / "clip" / "text.safetensors")
    unet = UNetStage(model, config, caption_dropout=recipe.caption_dropout)
    report["unet"] = stage_report("unet", _run(unet, data, recipe.unet, out, collate))

    final = out / "demo.safetensors"
    save_model(load_model(out / "unet" / "model.safetensors").model, config, final, dtype=torch.float16)
    report["size_bytes"] = final.stat().st_size
    report["recipe"] = asdict(recipe)
    if install is not None:
        install.parent.mkdir(parents=True, exist_ok=True)
        install.write_bytes(final.read_bytes())
        report["installed"] = str(install)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
