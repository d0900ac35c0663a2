"""``stablekit train``: train CLIP, the autoencoder or the UNet on image/caption pairs, teach a model a subject
(``dreambooth``) or train a LoRA for it (``lora``), or reproduce the demo model (``demo``) or its x4 upscaler
(``demo-upscaler``).

Stages run in order for a model from scratch: ``clip`` (the text encoder, contrastively), ``vae`` (the
autoencoder), then ``unet`` with ``--vae`` and ``--text`` pointing at their exports; or ``unet --model FILE``
fine-tunes a released checkpoint's UNet. ``dreambooth --model FILE --instance-data DIR --instance-prompt "a sks
dog"`` fine-tunes it on a few images of one subject; with ``--class-prompt "a dog"`` (the model then generates
``--num-class-images`` of the class into the run folder, once) or ``--class-data DIR`` it adds the
prior-preservation loss. It runs 400 steps at 5e-6 without EMA unless told otherwise. ``lora --model FILE`` takes
the same options, or ``--data`` for a captioned data set, and trains only low-rank updates (``--rank``, ``--alpha``)
of the attention projections into ``lora.safetensors`` (kohya/A1111 keys), at 1e-4.

Launch with ``torchrun --nproc_per_node N -m stablekit train ...`` for several processes. An interrupted run
continues with ``--resume``. Every run writes its energy and CO2 (measured by RAPL/NVML where readable, otherwise
estimated from CPU time) to ``footprint.json`` and ``footprint.md`` in ``--out``, summed over resumed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from stablekit.cli import UserError
from stablekit.config import PRESETS

if TYPE_CHECKING:
    from stablekit.train.dreambooth import DreamBooth
    from stablekit.train.filters import Filters
    from stablekit.train.footprint import FootprintSettings
    from stablekit.train.trainer import TrainConfig

_TRAIN_FLAGS = {  # TrainConfig field -> (type, help)
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "examples per micro-batch, over all processes"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "lr": (float, "learning rate after warm-up"),
    "warmup": (int, "linear warm-up steps (SD cards: 10000)"),
    "weight_decay": (float, "AdamW weight decay"),
    "ema_decay": (float, "EMA decay of the exported weights"),
    "grad_clip": (float, "clip the global gradient norm to this (default: no clipping)"),
    "precision": (str, "auto (bf16/fp16 autocast on CUDA, fp32 on CPU), fp32, bf16, fp16"),
    "seed": (int, "seed of the initial weights, the data order and the noise"),
    "log_every": (int, "steps per JSONL log line"),
    "checkpoint_every": (int, "steps per checkpoint"),
    "keep_checkpoints": (int, "checkpoints kept on disk"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train CLIP, the autoencoder or the UNet; DreamBooth; LoRA; reproduce the demo model or its upscaler",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("stage", choices=("clip", "vae", "unet", "dreambooth", "lora", "demo", "demo-upscaler"))
    p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, loss.png, the exported model")
    p.add_argument("--data", help="image folder (+ .txt captions), .jsonl/.parquet manifest or webdataset shards")
    p.add_argument("--config-preset", default="demo", choices=sorted(PRESETS), help="architecture (default: demo)")
    p.add_argument("--size", type=int, help="training image size (default: the preset's)")
    for name, (kind, text) in _TRAIN_FLAGS.items():
        choices = ("auto", "fp32", "bf16", "fp16") if name == "precision" else None
        p.add_argument("--" + name.replace("_", "-"), type=kind, choices=choices, help=text)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="unet: share of empty captions (for CFG)")
    p.add_argument("--vae", help="unet: the vae stage's vae.safetensors")
    p.add_argument("--text", help="unet: the clip stage's text.safetensors")
    p.add_argument(
        "--model", help="unet, dreambooth, lora: a whole model file to fine-tune (unet: instead of --vae/--text)"
    )
    p.add_argument("--kl-weight", type=float, default=1e-4, help="vae: weight of the KL term")
    p.add_argument("--recon", choices=("l1", "mse"), default="l1", help="vae: reconstruction loss")
    p.add_argument("--install", help="demo, demo-upscaler: where to copy the fp16 model (default: the package's)")
    db = p.add_argument_group("dreambooth, lora")
    db.add_argument("--instance-data", help="folder of the subject's images (a same-stem .txt overrides the prompt)")
    db.add_argument("--instance-prompt", help='their prompt, with a rare token for the subject: "a sks dog"')
    db.add_argument(
        "--class-prompt",
        action="append",
        default=[],
        help='the class\'s prompt ("a dog"), for prior preservation; repeat it to cycle through several',
    )
    db.add_argument("--num-class-images", type=int, default=100, help="class images the model generates (default 100)")
    db.add_argument("--class-data", help="a folder of class images to use instead of generating them")
    db.add_argument("--prior-loss-weight", type=float, default=1.0, help="weight of the class loss (default 1)")
    db.add_argument(
        "--train-text-encoder", action="store_true", help="train the text encoder too (lora: LoRA on its attention)"
    )
    lora = p.add_argument_group("lora")
    lora.add_argument("--rank", type=int, default=4, help="rank of the low-rank updates (default 4)")
    lora.add_argument("--alpha", type=float, help="their alpha: the update is scaled by alpha / rank (default: rank)")
    fp = p.add_argument_group("footprint (footprint.json / footprint.md in --out)")
    fp.add_argument("--carbon-intensity", type=float, help="g CO2 per kWh of the grid (default: world average 480)")
    fp.add_argument("--region", default="unknown", help="compute region, for the summary")
    fp.add_argument("--cloud-provider", default="unknown", help="cloud provider, for the summary")
    fp.add_argument(
        "--power-watts", type=float, help="the estimate's watts per busy CPU core, where energy is not measured (10)"
    )
    filters = p.add_argument_group("LAION-style filters (from metadata columns)")
    filters.add_argument("--min-size", type=int, help="drop images whose shorter side is smaller")
    filters.add_argument("--min-aesthetic", type=float, help="drop images with a lower aesthetic score")
    filters.add_argument("--max-punsafe", type=float, help="drop images with a higher punsafe probability")
    filters.add_argument("--max-watermark", type=float, help="drop images with a higher watermark probability")
    p.set_defaults(run=run)


def _train_config(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: TrainConfig's defaults) with the flags given."""
    from stablekit.train.trainer import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.no_progress:
        given["progress"] = False
    return replace(base or TrainConfig(), **given)


def _footprint(args: argparse.Namespace) -> FootprintSettings:
    from stablekit.train.footprint import FootprintSettings

    given = {"carbon_intensity": args.carbon_intensity, "power_watts": args.power_watts}
    try:
        return FootprintSettings(
            region=args.region, cloud_provider=args.cloud_provider, **{k: v for k, v in given.items() if v is not None}
        )
    except ValueError as e:
        raise UserError(str(e)) from e


def _filters(args: argparse.Namespace) -> Filters:
    from stablekit.train.filters import Filters

    return Filters(
        min_size=args.min_size,
        min_aesthetic=args.min_aesthetic,
        max_punsafe=args.max_punsafe,
        max_watermark=args.max_watermark,
    )


def _dreambooth_spec(args: argparse.Namespace) -> DreamBooth:
    from stablekit.train.dreambooth import DreamBooth

    if args.num_class_images < 1:
        raise UserError("--num-class-images must be positive")
    return DreamBooth(
        instance_data=args.instance_data,
        instance_prompt=args.instance_prompt,
        class_prompts=tuple(args.class_prompt),
        num_class_images=args.num_class_images,
        class_data=args.class_data,
        prior_loss_weight=args.prior_loss_weight,
        train_text_encoder=args.train_text_encoder,
        size=args.size,
    )


def _dreambooth(args: argparse.Namespace) -> int:
    from stablekit.train.dreambooth import DREAMBOOTH_TRAIN, train_dreambooth

    if not args.model or not args.instance_data:
        raise UserError("dreambooth needs --model and --instance-data")
    spec = _dreambooth_spec(args)
    cfg = _train_config(args, DREAMBOOTH_TRAIN)
    summary, report = train_dreambooth(args.model, args.out, spec, cfg, resume=args.resume, footprint=_footprint(args))
    print(
        f"{summary.steps} steps ({summary.precision}) in {summary.seconds:.0f} s on {report['instance_images']} "
        f"instance and {report['class_images']} class images, final loss {summary.final_loss:.4g}; "
        f"wrote {', '.join(str(p) for p in summary.exported)}"
    )
    return 0


def _lora(args: argparse.Namespace) -> int:
    from stablekit.train.lora import LORA_TRAIN, LoraSpec, train_lora

    if not args.model:
        raise UserError("lora needs --model")
    if bool(args.data) == bool(args.instance_data):
        raise UserError("lora needs either --instance-data (DreamBooth images) or --data (a captioned data set)")
    if args.data and (args.instance_prompt or args.class_prompt or args.class_data):
        raise UserError("--instance-prompt, --class-prompt and --class-data go with --instance-data, not --data")
    if args.rank < 1:
        raise UserError("--rank must be positive")
    if args.alpha is not None and not args.alpha > 0:
        raise UserError("--alpha must be positive")
    data = _dreambooth_spec(args) if args.instance_data else args.data
    spec = LoraSpec(
        data,
        rank=args.rank,
        alpha=args.alpha,
        train_text_encoder=args.train_text_encoder,
        size=args.size,
        filters=_filters(args),
    )
    cfg = _train_config(args, LORA_TRAIN)
    summary, report = train_lora(args.model, args.out, spec, cfg, resume=args.resume, footprint=_footprint(args))
    print(
        f"{summary.steps} steps ({summary.precision}) in {summary.seconds:.0f} s, {report['modules']} modules at rank "
        f"{report['rank']}, final loss {summary.final_loss:.4g}; wrote {', '.join(str(p) for p in summary.exported)}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from stablekit.train.stages import CLIPStage, Stage, UNetStage, VAEStage, assemble
    from stablekit.train.trainer import Trainer

    if args.stage == "demo":
        from stablekit.train.recipe import PACKAGED, DemoRecipe, train_demo

        recipe = DemoRecipe() if args.seed is None else replace(DemoRecipe(), seed=args.seed)
        report = train_demo(args.out, recipe, install=Path(args.install) if args.install else PACKAGED)
        print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))
        return 0
    if args.stage == "demo-upscaler":
        from stablekit.train.recipe import PACKAGED_UPSCALER, UpscalerRecipe, train_demo_upscaler

        recipe_x4 = UpscalerRecipe() if args.seed is None else replace(UpscalerRecipe(), seed=args.seed)
        install = Path(args.install) if args.install else PACKAGED_UPSCALER
        report = train_demo_upscaler(args.out, recipe_x4, install=install)
        print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))
        return 0

    if args.stage == "dreambooth":
        return _dreambooth(args)
    if args.stage == "lora":
        return _lora(args)

    from stablekit.train.data import collate, open_dataset

    if not args.data:
        raise UserError("--data is required")
    cfg = _train_config(args)
    footprint = _footprint(args)
    config = PRESETS[args.config_preset]
    filters = _filters(args)
    torch.manual_seed(cfg.seed)
    stage: Stage
    if args.stage == "clip":
        from stablekit.models.clip_image import CLIPConfig, ImageTowerConfig

        size = args.size or config.default_size
        stage = CLIPStage(config, CLIPConfig(config.text, ImageTowerConfig(image_size=size), config.text.width))
    elif args.stage == "vae":
        size = args.size or config.default_size
        stage = VAEStage(config, kl_weight=args.kl_weight, recon=args.recon)
    else:
        if args.model:
            from stablekit.weights import load_model

            loaded = load_model(args.model)
            model, config = loaded.model, loaded.config
        elif args.vae and args.text:
            model, config = assemble(config, vae=args.vae, text=args.text)
        else:
            raise UserError("the unet stage needs --vae and --text (earlier stages' exports), or --model")
        size = args.size or config.default_size
        stage = UNetStage(model, config, caption_dropout=args.caption_dropout)
    data = open_dataset(args.data, size=size, filters=filters)
    print(f"stablekit train {args.stage}: {len(data)} examples; {json.dumps(data.report())}", file=sys.stderr)
    summary = Trainer(stage, data, cfg, args.out, collate=collate, footprint=footprint).fit(resume=args.resume)
    # Open-time skips are the same in every (resumed) run; load-time ones are those this process met.
    print(
        f"{summary.steps} steps ({summary.precision}) in {summary.seconds:.0f} s, final loss {summary.final_loss:.4g}; "
        f"skipped {data.skipped()} unreadable samples; wrote {', '.join(str(p) for p in summary.exported)}"
    )
    return 0
