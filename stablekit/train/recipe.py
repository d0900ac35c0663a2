"""The demo models' recipes: generated shapes, then each network by the trainer.

``stablekit train demo --out DIR`` makes the demo text-to-image model (CLIP, the autoencoder, the UNet) and
``stablekit train demo-upscaler --out DIR`` its x4 upscaler (an f=4 autoencoder, its decoder fine-tuned, then the
upscaler UNet, with the demo model's text tower frozen); each writes the fp16 file the package ships. Every stage
resumes from its newest checkpoint, so an interrupted reproduction is continued by running it again. Measured on
this 2-core CPU: CLIP 2.6 min, the autoencoder 17 min, the UNet 26 min (some of it sharing the CPU); the
upscaler: see :class:`UpscalerRecipe`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from stablekit.config import DEMO, DEMO_X4, ModelConfig
from stablekit.demo import MODEL as PACKAGED
from stablekit.demo import UPSCALER as PACKAGED_UPSCALER
from stablekit.models.clip_image import CLIPConfig, ImageTowerConfig
from stablekit.train.stages import CLIPStage, DecoderStage, Stage, UNetStage, UpscalerStage, VAEStage, assemble
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


@dataclass(frozen=True)
class UpscalerRecipe:
    """The demo x4 upscaler: the autoencoder and the UNet on random crops of demo shapes rendered at
    ``image_size``, between them the decoder on whole renders at the output size.

    128 px renders put the shapes' edges at the scale of the 256 px outputs (half of it; 64 px renders would
    be a quarter); crops keep the steps cheap. The UNet's crop (96 px: 24x24 latents) is larger than the
    autoencoder's so that its lowest level still sees a 6x6 neighbourhood. The low-res inputs are Lanczos
    downsamples, the demo images' own antialiasing: a run on bicubic ones, given the demo generator's 64 px
    renders, scored 0.66 dB PSNR below the same run given bicubic downsamples of the 256 px renders
    (``benchmarks/demo_upscale.py``, at 1250 steps).

    Logged training time on this 2-core CPU, shared with other jobs: the autoencoder 21 min, the decoder 18 min
    (one thread, beside the UNet), the UNet 43 min.
    """

    config: ModelConfig = DEMO_X4
    text_from: Path = PACKAGED  # the demo model whose text tower is reused, frozen
    examples: int = 10_000
    image_size: int = 128
    seed: int = 0
    vae_crop: int = 64
    # The demo model's autoencoder recipe (Adam betas and clipping against loss spikes), shorter.
    vae: TrainConfig = replace(DemoRecipe.vae, steps=2000, checkpoint_every=250)
    kl_weight: float = 1e-4
    # The decoder fine-tuned with MSE, the encoder frozen (see DecoderStage), on whole renders at the output size:
    # GroupNorm's statistics are the whole image's, so a decoder trained on 64 px crops decoded the flat colours
    # of whole 256 px images 1-5 levels off (flat-area PSNR 39.3 dB; 46.2 dB decoding the same image in 64 px
    # tiles).
    decoder_examples: int = 2000
    decoder: TrainConfig = TrainConfig(
        steps=400,
        batch_size=2,
        lr=1e-4,
        warmup=25,
        adam_betas=(0.5, 0.9),
        grad_clip=1.0,
        ema_decay=0.995,
        log_every=25,
        checkpoint_every=100,
    )
    unet_crop: int = 96
    # The demo model's UNet recipe, on half the batch for half as long.
    unet: TrainConfig = replace(DemoRecipe.unet, steps=3000, batch_size=16, checkpoint_every=250)
    caption_dropout: float = 0.1
    low_res_filter: Literal["bicubic", "lanczos"] = "lanczos"


def _run(stage: Stage, data: Any, cfg: TrainConfig, out: Path, collate: Any) -> Summary:
    return Trainer(stage, data, cfg, out / stage.name, collate=collate).fit(resume=True)


def _open_demo_data(data_dir: Path, examples: int, size: int) -> tuple[Any, dict[str, Any]]:
    """The demo dataset in ``data_dir`` (written once, from the fixed training seed), and its report."""
    from stablekit.train.data import open_dataset
    from stablekit.train.demo_data import write_demo_dataset

    t0 = time.perf_counter()
    if not (data_dir / ".complete").exists():
        write_demo_dataset(data_dir, examples, size=size)
        (data_dir / ".complete").touch()
    data = open_dataset(data_dir, size=size)
    return data, {"data_seconds": round(time.perf_counter() - t0, 1), "examples": len(data)}


def _stage_report(out: Path, name: str, s: Summary) -> dict[str, Any]:
    rows = (out / name / "log.jsonl").read_text().splitlines()
    return {
        "steps": s.steps,
        "final_loss": s.final_loss,
        "seconds": round(float(json.loads(rows[-1])["time"]) if rows else 0.0, 1),  # over every resumed run
        "resumed_from": s.resumed_from,
    }


def _finish(
    out: Path, trained: Path, config: ModelConfig, name: str, report: dict[str, Any], recipe: Any, install: Path | None
) -> dict[str, Any]:
    """Write the trained model as ``out/name`` in fp16, copy it to ``install``, and the report beside it."""
    final = out / name
    save_model(load_model(trained).model, config, final, dtype=torch.float16)
    report["size_bytes"] = final.stat().st_size
    report["recipe"] = asdict(recipe)
    if install is not None:
        install.parent.mkdir(parents=True, exist_ok=True)
        install.write_bytes(final.read_bytes())
        report["installed"] = str(install)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def train_demo(
    out: str | Path, recipe: DemoRecipe = DemoRecipe(), *, install: Path | None = PACKAGED
) -> dict[str, Any]:
    """Reproduce the demo model under ``out``; copy it (fp16) to ``install``. Returns the per-stage report."""
    from stablekit.train.data import collate

    out = Path(out)
    data, report = _open_demo_data(out / "data", recipe.examples, recipe.config.default_size)
    torch.manual_seed(recipe.seed)
    clip = CLIPStage(recipe.config, CLIPConfig(recipe.config.text, recipe.image_tower, recipe.config.text.width))
    report["clip"] = _stage_report(out, "clip", _run(clip, data, recipe.clip, out, collate))
    torch.manual_seed(recipe.seed)
    vae = VAEStage(recipe.config, kl_weight=recipe.kl_weight)
    report["vae"] = _stage_report(out, "vae", _run(vae, data, recipe.vae, out, collate))
    torch.manual_seed(recipe.seed)
    model, config = assemble(recipe.config, vae=out / "vae" / "vae.safetensors", text=out / "clip" / "text.safetensors")
    unet = UNetStage(model, config, caption_dropout=recipe.caption_dropout)
    report["unet"] = _stage_report(out, "unet", _run(unet, data, recipe.unet, out, collate))
    return _finish(out, out / "unet" / "model.safetensors", config, "demo.safetensors", report, recipe, install)


def train_demo_upscaler(
    out: str | Path, recipe: UpscalerRecipe = UpscalerRecipe(), *, install: Path | None = PACKAGED_UPSCALER
) -> dict[str, Any]:
    """Train the demo x4 upscaler under ``out``; copy it (fp16) to ``install``. Returns the per-stage report."""
    from stablekit.train.data import collate

    out = Path(out)
    data, report = _open_demo_data(out / "data", recipe.examples, recipe.image_size)
    torch.manual_seed(recipe.seed)
    vae = VAEStage(recipe.config, kl_weight=recipe.kl_weight, crop=recipe.vae_crop)
    report["vae"] = _stage_report(out, "vae", _run(vae, data, recipe.vae, out, collate))
    torch.manual_seed(recipe.seed)
    size = recipe.config.default_size
    whole, _ = _open_demo_data(out / f"data-{size}", recipe.decoder_examples, size)
    decoder = DecoderStage(out / "vae" / "vae.safetensors")
    report["decoder"] = _stage_report(out, "decoder", _run(decoder, whole, recipe.decoder, out, collate))
    torch.manual_seed(recipe.seed)
    # The UNet trains on the encoder's latents, the same in both files; the final model decodes with the new decoder.
    model, config = assemble(recipe.config, vae=out / "decoder" / "vae.safetensors", text=recipe.text_from)
    unet = UpscalerStage(
        model,
        config,
        caption_dropout=recipe.caption_dropout,
        crop=recipe.unet_crop,
        low_res_filter=recipe.low_res_filter,
    )
    report["upscaler"] = _stage_report(out, "upscaler", _run(unet, data, recipe.unet, out, collate))
    trained = out / "upscaler" / "model.safetensors"
    return _finish(out, trained, config, "upscaler.safetensors", report, recipe, install)
