"""DreamBooth (Ruiz et al. 2022, arXiv:2208.12242): teach a text-to-image model one subject from a few images,
under a prompt with a rare token ("a sks dog").

Each example pairs an instance image (captioned with the instance prompt) with a class image (captioned with a
class prompt, "a dog"); the loss is instance MSE + λ · class MSE, the paper's prior-preservation loss (eq. 2).
The class images are the model's own samples of the class, made before training, so the second term holds the
model to what it already drew for those words, and the subject does not leak into every prompt that shares them
("language drift"). They are generated through the public pipeline into the run folder (``class_images/``,
image i from seed + i) and read back from there, so a resumed run neither generates them again nor sees other
pixels.

Only the UNet is trained unless ``train_text_encoder``; the autoencoder stays frozen. The loop is the ordinary
trainer's (exact resume, optional EMA, progress, ``log.jsonl``, ``loss.png``). The export is ``model.safetensors``
(what ``stablekit generate --model`` loads) and ``diffusers-config/``, the configs and tokenizer diffusers needs to
load that file offline: ``StableDiffusionPipeline.from_single_file(file, config=folder, local_files_only=True)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stablekit.atomic import replacing_file, replacing_folder
from stablekit.config import ModelConfig
from stablekit.diffusion import add_noise, alphas_cumprod, training_target
from stablekit.images import from_pil, load_image, save_png, to_rgb
from stablekit.models.ldm import LatentDiffusion
from stablekit.text.tokenizer import tokenize
from stablekit.train.data import resize_crop
from stablekit.train.footprint import FootprintSettings
from stablekit.train.sources import IMAGE_SUFFIXES, DataError
from stablekit.train.stages import Batch, Draws, Stage, StepContext, _per_sample_share
from stablekit.train.trainer import Summary, TrainConfig, Trainer, init_distributed
from stablekit.weights import load_model, save_model
from stablekit.weights.diffusers import write_folder

Pair = tuple[Tensor, str]  # an image (3, S, S) in [-1, 1] and its caption

# The diffusers DreamBooth example's settings: one instance and one class image per step, a small constant rate,
# a few hundred steps. No EMA (decay 0 exports the last step's weights): over so few steps an average lags.
DREAMBOOTH_TRAIN = TrainConfig(
    steps=400, batch_size=1, lr=5e-6, warmup=0, ema_decay=0.0, log_every=10, checkpoint_every=100
)
CLASS_FOLDER = "class_images"


def _pixels(path: Path, size: int) -> Tensor:
    return from_pil(resize_crop(to_rgb(load_image(path)), size))[0]  # (3, S, S)


def read_images(folder: str | Path, size: int, prompt: str | None = None) -> list[Pair]:
    """Every image in ``folder`` (sorted by name), resized and centre-cropped to ``size``, captioned by its
    same-stem ``.txt`` file if it has one, else by ``prompt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for path in paths:
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8").strip() if text.is_file() else prompt
        if not caption:
            raise DataError(f"{path}: no caption (a same-stem .txt file) and no prompt given for it")
        pairs.append((_pixels(path, size), caption))
    return pairs


def class_images(
    model: str | Path, prompts: Sequence[str], n: int, folder: str | Path, *, seed: int = 0, batch: int = 16
) -> list[Path]:
    """``n`` class images in ``folder``: image i (``000000.png``, its prompt in ``000000.txt``) is the model's
    sample of ``prompts[i % len(prompts)]`` from seed ``seed + i``. Images already there for the same model,
    prompt and seed are kept, so a resumed run (or a longer one, with a larger ``n``) generates only what is
    missing. The ``.txt`` is written last: an image is cached once its caption is there."""
    if n < 1 or not prompts:
        raise ValueError("prior preservation needs at least one class prompt and one class image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = {"model": str(Path(model).resolve()), "bytes": Path(model).stat().st_size, "seed": seed}
    manifest = folder / "source.json"
    same = manifest.is_file() and json.loads(manifest.read_text()) == source
    want = [prompts[i % len(prompts)] for i in range(n)]
    paths = [folder / f"{i:06d}.png" for i in range(n)]

    def cached(i: int) -> bool:
        text = paths[i].with_suffix(".txt")
        return same and paths[i].is_file() and text.is_file() and text.read_text(encoding="utf-8") == want[i]

    missing = [i for i in range(n) if not cached(i)]
    if missing:
        from stablekit.pipelines import GenerationParams, Pipeline, generate

        print(f"stablekit train: generating {len(missing)} class images into {folder}", file=sys.stderr)
        with replacing_file(manifest) as tmp:
            tmp.write_text(json.dumps(source))
        pipe = Pipeline.from_file(model)
        for start in range(0, len(missing), batch):
            chunk = missing[start : start + batch]
            params = GenerationParams([want[i] for i in chunk], seeds=[seed + i for i in chunk])
            for i, image in zip(chunk, generate(pipe, params), strict=True):
                save_png(image, paths[i], f"{want[i]}\nSeed: {seed + i}")
                with replacing_file(paths[i].with_suffix(".txt")) as tmp:
                    tmp.write_text(want[i], encoding="utf-8")
        del pipe
    return paths


class PairedData:
    """Item i is (instance i mod I, class i mod C), or the instance alone without class images; as many items as
    the larger set, so every instance image is seen equally often in an epoch."""

    def __init__(self, instances: Sequence[Pair], classes: Sequence[Pair] = ()) -> None:
        if not instances:
            raise ValueError("DreamBooth needs at least one instance image")
        self.instances, self.classes = list(instances), list(classes)

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> tuple[Pair, Pair | None]:
        cls = self.classes[index % len(self.classes)] if self.classes else None
        return self.instances[index % len(self.instances)], cls


def collate_pairs(items: list[tuple[Pair, Pair | None]]) -> Batch:
    """The instance images, then (with prior preservation) the class images: (b or 2b, 3, S, S) and captions."""
    rows = [inst for inst, _ in items] + [cls for _, cls in items if cls is not None]
    return torch.stack([image for image, _ in rows]), [caption for _, caption in rows]


class DreamBoothStage(Stage):
    """The latent-diffusion objective on instance rows plus ``prior_loss_weight`` times the same on class rows.

    The batch holds b instance rows then, with prior preservation, b class rows; a per-pair loss makes the step
    objective the mean over pairs of (instance MSE + λ · class MSE). Each half takes its noise from its own draws
    of the step's generator, so a pair's noise does not depend on the micro-batch or process it lands in.
    No caption dropout: the model already knows the empty prompt, and the class term keeps it."""

    name = "dreambooth"

    def __init__(
        self,
        model: LatentDiffusion,
        config: ModelConfig,
        *,
        prior_loss_weight: float = 1.0,
        train_text_encoder: bool = False,
    ) -> None:
        if config.conditioning != "txt2img":
            raise ValueError(f"DreamBooth trains text-to-image models; {config.name} is {config.conditioning}")
        if prior_loss_weight < 0:
            raise ValueError(f"the prior loss weight must be non-negative, got {prior_loss_weight}")
        self.model, self.config = model, config
        self.prior_loss_weight = prior_loss_weight
        self.train_text_encoder = train_text_encoder
        model.eval().requires_grad_(False)
        self.module = self.trainable()
        self.alphas_cumprod = alphas_cumprod(config.schedule)

    def trainable(self) -> nn.Module:
        """What trains, under its own names: the trainer's checkpoints, optimizer and EMA then hold only it."""
        trained: dict[str, nn.Module] = {"diffusion_model": self.model.model.diffusion_model}
        if self.train_text_encoder:
            trained["cond_stage_model"] = self.model.cond_stage_model
        return nn.ModuleDict(trained).requires_grad_(True)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        images, captions = batch
        b = ctx.rows.stop - ctx.rows.start
        halves = len(captions) // b  # 2 with class rows after the instance rows, else 1
        draws = Draws(ctx)
        vae = self.model.first_stage_model
        with torch.no_grad():
            post = vae.encode(images.to(ctx.device))
            eps = torch.cat([draws.randn(*post.mean.shape[1:]) for _ in range(halves)]).to(post.mean.dtype)
            z = (post.mean + post.std * eps).float() * self.config.vae.scale_factor  # (halves·b, 4, h, w)
        t = torch.cat([draws.randint(self.config.schedule.num_train_timesteps) for _ in range(halves)])
        noise = torch.cat([draws.randn(*z.shape[1:]) for _ in range(halves)])
        text = self.config.text
        ids = tokenize(captions, pad_token=text.pad_token, context_length=text.context_length).ids.to(ctx.device)
        with torch.set_grad_enabled(self.train_text_encoder):
            context = self.model.cond_stage_model(ids)
        x_t = add_noise(z, noise, t, self.config.schedule)
        ac = self.alphas_cumprod.to(ctx.device)[t].reshape(-1, 1, 1, 1)
        target = training_target(z, noise, ac.sqrt(), (1 - ac).sqrt(), self.config.schedule.prediction)
        pred = self.model.model.diffusion_model(x_t, t.float(), context).float()
        err = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # (halves·b,)
        per_pair = err[:b] + self.prior_loss_weight * err[b:] if halves == 2 else err
        return _per_sample_share(per_pair, ctx)

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        raw = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(weights)
        path, configs = out / "model.safetensors", out / "diffusers-config"
        try:
            save_model(self.model, self.config, path)
        finally:
            self.module.load_state_dict(raw)
        with replacing_folder(configs, overwrite=True) as tmp:
            write_folder(tmp, self.config, {}, weights=False)
        return [path, configs]


@dataclass(frozen=True)
class DreamBooth:
    """What to teach: the instance images and their prompt, and the class prior (prompts to generate class images
    from, or a folder of them; neither: no prior preservation)."""

    instance_data: str | Path
    instance_prompt: str | None = None  # for instance images without their own .txt caption
    class_prompts: tuple[str, ...] = ()
    num_class_images: int = 100
    class_data: str | Path | None = None  # for class images without their own .txt, class_prompts[0]
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    size: int | None = None  # default: the model's

    @property
    def prior(self) -> bool:
        return bool(self.class_prompts) or self.class_data is not None


def train_dreambooth(
    model: str | Path,
    out: str | Path,
    spec: DreamBooth,
    cfg: TrainConfig = DREAMBOOTH_TRAIN,
    *,
    resume: bool = False,
    footprint: FootprintSettings | None = None,
) -> tuple[Summary, dict[str, Any]]:
    """Fine-tune ``model`` (a file ``load_model`` reads) as ``spec`` says, into the run folder ``out``.
    Returns the trainer's summary and what the data held."""
    out = Path(out)
    loaded = load_model(model)
    size = spec.size or loaded.config.default_size
    data, report = paired_data(model, out, spec, cfg.seed, size)
    stage = DreamBoothStage(
        loaded.model,
        loaded.config,
        prior_loss_weight=spec.prior_loss_weight,
        train_text_encoder=spec.train_text_encoder,
    )
    summary = Trainer(stage, data, cfg, out, collate=collate_pairs, footprint=footprint).fit(resume=resume)
    return summary, report


def paired_data(
    model: str | Path, out: Path, spec: DreamBooth, seed: int, size: int
) -> tuple[PairedData, dict[str, Any]]:
    """The instance images and, with prior preservation, the class images (generated by ``model`` into
    ``out``'s class folder from ``seed`` where ``spec`` gives no folder of them); and what they held."""
    instances = read_images(spec.instance_data, size, spec.instance_prompt)
    classes: list[Pair] = []
    if spec.class_data is not None:
        classes = read_images(spec.class_data, size, spec.class_prompts[0] if spec.class_prompts else None)
    elif spec.class_prompts:
        rank, _, _ = init_distributed()
        if rank == 0:  # one process generates; the others read what it wrote
            class_images(model, spec.class_prompts, spec.num_class_images, out / CLASS_FOLDER, seed=seed)
        if dist.is_initialized():
            dist.barrier()
        paths = [out / CLASS_FOLDER / f"{i:06d}.png" for i in range(spec.num_class_images)]
        classes = [(_pixels(p, size), p.with_suffix(".txt").read_text(encoding="utf-8")) for p in paths]
    report = {"instance_images": len(instances), "class_images": len(classes), "size": size}
    return PairedData(instances, classes), report
