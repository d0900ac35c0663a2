"""What is trained, and how its loss is computed: the KL autoencoder, CLIP, the latent-diffusion UNet and the x4
upscaler's UNet.

A :class:`Stage` owns its trainable ``module`` (and any frozen networks beside it), computes the loss of one
micro-batch and, at the end, exports the averaged weights as the file the next stage or a user loads. The loop
in :mod:`stablekit.train.trainer` is the same for all of them.

Every random number a loss needs (noise, timesteps, caption dropout) comes from :class:`StepContext`, which
draws it for *all* examples of the optimizer step from a generator seeded by (seed, step) and hands each
micro-batch on each process its own rows. So the result depends neither on how a step is split into
micro-batches and processes nor on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from stablekit.config import ModelConfig
from stablekit.diffusion import add_noise, alphas_cumprod, training_target
from stablekit.models.clip_image import CLIPConfig, CLIPModel, contrastive_loss
from stablekit.models.ldm import LatentDiffusion
from stablekit.models.unet import UNetModel
from stablekit.models.vae import AutoencoderKL
from stablekit.text.tokenizer import tokenize
from stablekit.weights import read_checkpoint, save_model
from stablekit.weights.detect import METADATA_KEY, config_from_json, config_to_json
from stablekit.weights.load import write_safetensors

Batch = tuple[Tensor, list[str]]  # images (B, 3, S, S) in [-1, 1], captions


@dataclass(frozen=True)
class StepContext:
    """One micro-batch's place in its optimizer step, and the step's shared random numbers."""

    seed: int
    step: int
    rows: slice  # this micro-batch's rows among the step's ``total`` examples
    total: int  # examples per optimizer step, over every micro-batch and process
    accum: int  # micro-batches per step
    world: int  # processes
    device: torch.device
    gather: Callable[[Tensor], Tensor]  # concatenates a (b, ...) tensor of every process along dim 0, with grad

    def generator(self) -> torch.Generator:
        # SeedSequence mixes (seed, step) so neighbouring steps get unrelated streams.
        state = int(np.random.SeedSequence([self.seed, self.step]).generate_state(1, np.uint64)[0])
        return torch.Generator().manual_seed(state & (2**63 - 1))


class Draws:
    """Random tensors for this micro-batch's rows, drawn in the same order on every process and micro-batch."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.gen = ctx.generator()

    def randn(self, *shape: int) -> Tensor:
        return torch.randn((self.ctx.total, *shape), generator=self.gen)[self.ctx.rows].to(self.ctx.device)

    def rand(self) -> Tensor:
        return torch.rand((self.ctx.total,), generator=self.gen)[self.ctx.rows].to(self.ctx.device)

    def randint(self, high: int) -> Tensor:
        return torch.randint(high, (self.ctx.total,), generator=self.gen)[self.ctx.rows].to(self.ctx.device)


class Stage:
    """Base of the stages. ``loss`` returns (what to backpropagate, this process's share of the logged
    step loss): summed over micro-batches and processes, the first's gradients and the second's values give
    the step objective's gradient and value."""

    name: str
    module: nn.Module

    def to(self, device: torch.device) -> None:
        self.module.to(device)

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        """Write the trained model (``weights``: the module's EMA state dict) into ``out``; the paths written."""
        raise NotImplementedError


def _per_sample_share(per_sample: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
    loss = per_sample.sum() / ctx.total  # (b,) -> this micro-batch's part of the step's mean
    return loss, loss.detach()


def random_crop(images: Tensor, size: int, draws: Draws) -> Tensor:
    """A ``size`` x ``size`` window of each image at offsets from ``draws``: (b, C, H, W) -> (b, C, size, size)."""
    h, w = images.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"a {size}-pixel crop does not fit {h}x{w} images")
    ys, xs = draws.randint(h - size + 1).tolist(), draws.randint(w - size + 1).tolist()
    return torch.stack([im[:, y : y + size, x : x + size] for im, y, x in zip(images, ys, xs, strict=True)])


# --- KL autoencoder ------------------------------------------------------------------------------------------


class VAEStage(Stage):
    """Reconstruction (L1 or MSE) plus a small KL term towards N(0, I), per latent element.

    The adversarial and perceptual (LPIPS) losses of the released autoencoder are left out: the demo's flat
    shapes reconstruct well without them, and LPIPS would need pretrained VGG weights. With ``crop`` each image
    is trained on as a random ``crop``-pixel window (the autoencoder is convolutional: it then runs at any size).
    """

    name = "vae"
    module: AutoencoderKL

    def __init__(
        self,
        config: ModelConfig,
        *,
        kl_weight: float = 1e-4,
        recon: Literal["l1", "mse"] = "l1",
        init_logvar: float | None = -6.0,
        crop: int | None = None,
    ) -> None:
        self.config = config
        self.kl_weight = kl_weight
        self.recon = recon
        self.crop = crop
        self.module = AutoencoderKL(config.vae)
        if init_logvar is not None:
            # Start from a nearly deterministic posterior (σ = e^{-3} ≈ 0.05): at the default σ ≈ 1 the decoder
            # first sees mostly noise, and a small autoencoder then takes many times longer to start learning.
            bias = self.module.quant_conv.bias
            assert bias is not None
            with torch.no_grad():
                bias[config.vae.embed_dim :].fill_(init_logvar)

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        images = batch[0].to(ctx.device)
        draws = Draws(ctx)
        if self.crop is not None:
            images = random_crop(images, self.crop, draws)
        post = self.module.encode(images)
        z = post.mean + post.std * draws.randn(*post.mean.shape[1:]).to(post.mean.dtype)
        rec = self.module.decode(z).float()
        err = (rec - images).abs() if self.recon == "l1" else (rec - images) ** 2
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)  # KL(q(z|x) || N(0, I)) per latent element
        return _per_sample_share(err.mean(dim=(1, 2, 3)) + self.kl_weight * kl.mean(dim=(1, 2, 3)), ctx)

    @torch.no_grad()
    def latent_scale(self, data: Iterable[Batch], device: torch.device) -> float:
        """1 / std of posterior samples: LDM's ``scale_by_std``, so the UNet sees latents of unit variance."""
        zs = [self.module.encode(images.to(device)).sample().float().flatten() for images, _ in data]
        return float(1.0 / torch.cat(zs).std())

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        raw = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(weights)
        device = next(self.module.parameters()).device
        self.module.eval()
        scale = self.latent_scale(data, device)
        self.module.load_state_dict(raw)
        self.module.train()
        config = replace(self.config, vae=replace(self.config.vae, scale_factor=scale))
        path = out / "vae.safetensors"
        state = {f"first_stage_model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
        write_safetensors(path, state, {METADATA_KEY: config_to_json(config), "format": "pt"})
        return [path]


class DecoderStage(VAEStage):
    """Fine-tunes a trained autoencoder's decoder with its encoder, and so its latents, frozen (as SD's ft-MSE
    decoder was made): a UNet trained on those latents stays valid, and the latent scale is the file's. MSE by
    default, the error PSNR measures. Without ``crop`` it trains on whole images, which is what a decoder
    trained on crops may need: its GroupNorm statistics are the whole input's.
    """

    name = "decoder"

    def __init__(self, vae: str | Path, *, recon: Literal["l1", "mse"] = "mse", crop: int | None = None) -> None:
        state, config = _part(vae, "first_stage_model.")
        if config is None:
            raise ValueError(f"{vae}: no stablekit config in the metadata (the vae stage's export has one)")
        super().__init__(config, kl_weight=0.0, recon=recon, init_logvar=None, crop=crop)
        self.module.load_state_dict(state, strict=True)
        for frozen in (self.module.encoder, self.module.quant_conv):
            frozen.requires_grad_(False)

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        path = out / "vae.safetensors"
        state = {f"first_stage_model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
        write_safetensors(path, state, {METADATA_KEY: config_to_json(self.config), "format": "pt"})
        return [path]


# --- CLIP ------------------------------------------------------------------------------------------------------


class CLIPStage(Stage):
    """Contrastive image-text pre-training of SD1's text tower with a learned temperature.

    The loss contrasts every image of the micro-batch with every caption of it, across processes (features are
    gathered); with gradient accumulation each micro-batch is its own contrastive batch.
    """

    name = "clip"
    module: CLIPModel

    def __init__(self, config: ModelConfig, clip: CLIPConfig) -> None:
        if clip.text != config.text:
            raise ValueError("the CLIP text tower must be the model's text encoder config")
        self.config = config
        self.module = CLIPModel(clip)

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        images, captions = batch
        text = self.config.text
        ids = tokenize(captions, pad_token=text.pad_token, context_length=text.context_length).ids
        img = ctx.gather(self.module.encode_image(images.to(ctx.device)).float())  # (B, E), B over processes
        txt = ctx.gather(self.module.encode_text(ids.to(ctx.device)).float())
        # Every process computes the whole micro-batch loss but holds the graph of its own rows only, so the
        # summed gradients are the loss's gradient. The temperature is shared by all rows: each process passes
        # 1/world of its gradient (same value). The logged value is split evenly.
        own = self.module.logit_scale
        loss = contrastive_loss(img, txt, own / ctx.world + (own * (1 - 1 / ctx.world)).detach())
        return loss / ctx.accum, loss.detach() / (ctx.accum * ctx.world)

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        meta = {METADATA_KEY: config_to_json(self.config), "format": "pt"}
        cpu = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        text = {f"cond_stage_model.{k.removeprefix('text.')}": v for k, v in cpu.items() if k.startswith("text.")}
        write_safetensors(out / "text.safetensors", text, meta)
        write_safetensors(out / "clip.safetensors", cpu, meta)
        return [out / "text.safetensors", out / "clip.safetensors"]


# --- latent diffusion ------------------------------------------------------------------------------------------


def _part(path: str | Path, prefix: str) -> tuple[dict[str, Tensor], ModelConfig | None]:
    ckpt = read_checkpoint(path)
    assert ckpt.tensors is not None
    state = {k.removeprefix(prefix): t for k, t in ckpt.tensors.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: holds no {prefix}* tensors")
    meta = (ckpt.metadata or {}).get(METADATA_KEY)
    return state, config_from_json(meta) if meta else None


def assemble(config: ModelConfig, *, vae: str | Path, text: str | Path) -> tuple[LatentDiffusion, ModelConfig]:
    """A model whose autoencoder and text encoder come from the earlier stages' files and whose UNet is new.
    The latent scale is the VAE file's."""
    vae_state, vae_cfg = _part(vae, "first_stage_model.")
    text_state, _ = _part(text, "cond_stage_model.")
    if vae_cfg is not None:
        config = replace(config, vae=replace(config.vae, scale_factor=vae_cfg.vae.scale_factor))
    model = LatentDiffusion(config)
    model.first_stage_model.load_state_dict(vae_state, strict=True)
    model.cond_stage_model.load_state_dict(text_state, strict=True)
    return model, config


class UNetStage(Stage):
    """The latent-diffusion objective: x_t = α_t z + σ_t ε with t uniform over the training steps, and the MSE
    between the UNet's output and the family's target (ε, or v = α ε - σ z). The autoencoder and the text
    encoder are frozen; a caption is replaced by the empty one with probability ``caption_dropout``, which
    teaches the unconditional prediction that classifier-free guidance needs. A subclass conditions the UNet
    further by overriding :meth:`condition`."""

    name = "unet"
    conditioning = "txt2img"
    module: UNetModel

    def __init__(self, model: LatentDiffusion, config: ModelConfig, *, caption_dropout: float = 0.1) -> None:
        if config.conditioning != self.conditioning:
            raise ValueError(
                f"{type(self).__name__} trains {self.conditioning} UNets; {config.name} is {config.conditioning}"
            )
        self.model = model
        self.config = config
        self.caption_dropout = caption_dropout
        self.module = model.model.diffusion_model
        for frozen in (model.first_stage_model, model.cond_stage_model):
            frozen.eval().requires_grad_(False)
        self.module.train().requires_grad_(True)
        self.alphas_cumprod = alphas_cumprod(config.schedule)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    def condition(self, images: Tensor, draws: Draws) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(the images the latents are taken from, channels concatenated to z_t, class labels y); text-to-image
        has neither, and draws nothing (its draws then stay those of the runs before this hook)."""
        return images, None, None

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        images, captions = batch
        draws = Draws(ctx)
        with torch.no_grad():
            images, concat, labels = self.condition(images.to(ctx.device), draws)
            post = self.model.first_stage_model.encode(images)
            z = post.mean + post.std * draws.randn(*post.mean.shape[1:]).to(post.mean.dtype)
            z = z.float() * self.config.vae.scale_factor  # (b, 4, h, w)
            keep = draws.rand() >= self.caption_dropout
            prompts = [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]
            text = self.config.text
            ids = tokenize(prompts, pad_token=text.pad_token, context_length=text.context_length).ids
            context = self.model.cond_stage_model(ids.to(ctx.device))
        t = draws.randint(self.config.schedule.num_train_timesteps)
        noise = draws.randn(*z.shape[1:])
        x_t = add_noise(z, noise, t, self.config.schedule)
        ac = self.alphas_cumprod.to(ctx.device)[t].reshape(-1, 1, 1, 1)
        target = training_target(z, noise, ac.sqrt(), (1 - ac).sqrt(), self.config.schedule.prediction)
        x_in = x_t if concat is None else torch.cat([x_t, concat.to(x_t.dtype)], dim=1)  # (b, 4 + c, h, w)
        pred = self.module(x_in, t.float(), context, labels).float()
        return _per_sample_share(((pred - target) ** 2).mean(dim=(1, 2, 3)), ctx)

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        """``model.safetensors``: the whole model with the EMA UNet, what ``stablekit generate`` loads."""
        raw = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(weights)
        path = out / "model.safetensors"
        try:
            save_model(self.model, self.config, path)
        finally:
            self.module.load_state_dict(raw)
        return [path]


def lanczos_downsample(images: Tensor, factor: int, a: int = 3) -> Tensor:
    """Antialiased Lanczos-``a`` downsampling by an integer ``factor``, as PIL's ``resize(..., LANCZOS)`` does
    it (the kernel stretched by ``factor``, 2·a·factor taps per axis, normalised); edges are replicated where
    PIL renormalises the clipped kernel. (B, C, H, W) -> (B, C, H/factor, W/factor)."""
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"{tuple(images.shape[-2:])} is not a multiple of {factor}")
    # Output pixel i has its centre at input position (i + ½)·factor; tap k sits at input pixel
    # factor·i - (a·factor - factor/2) + k, whose centre is ½ further.
    k = torch.arange(2 * a * factor, dtype=torch.float64)
    d = (k + 0.5 - a * factor) / factor  # distances from the output centre, in output pixels
    w = torch.sinc(d) * torch.sinc(d / a)
    w = (w / w.sum()).to(images.dtype)
    c, pad = images.shape[1], a * factor - factor // 2
    kernel = w.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1).to(images.device)  # (C, 1, 1, taps)
    x = nn.functional.pad(images, (pad, pad, 0, 0), mode="replicate")
    x = nn.functional.conv2d(x, kernel, stride=(1, factor), groups=c)  # rows
    x = nn.functional.pad(x, (0, 0, pad, pad), mode="replicate")
    return nn.functional.conv2d(x, kernel.transpose(2, 3), stride=(factor, 1), groups=c)  # columns


class UpscalerStage(UNetStage):
    """The x4 upscaler's objective (LDM's ``LatentUpscaleDiffusion``): the latent-diffusion loss on a high-res
    image x₀ (a random ``crop``-pixel window, if given), with the UNet also seeing x₀ downsampled by the
    autoencoder's factor (antialiased bicubic, or Lanczos to match images antialiased that way), noised to a
    level ℓ ~ U{0..max_noise_level} of the low-res schedule (√ᾱ_ℓ·lr + √(1-ᾱ_ℓ)·n, the released model's noise
    augmentation), concatenated to z_t, with ℓ as its class label.

    The label embedding starts at zero: each of its rows is trained by one level's share of the examples only
    (1/351 for the demo), and from ``nn.Embedding``'s N(0, 1) a row would start as a large random shift of the
    time embedding that a short run never trains away.
    """

    name = "upscaler"
    conditioning = "upscale"

    def __init__(
        self,
        model: LatentDiffusion,
        config: ModelConfig,
        *,
        caption_dropout: float = 0.1,
        crop: int | None = None,
        low_res_filter: Literal["bicubic", "lanczos"] = "bicubic",
        zero_init_labels: bool = True,
    ) -> None:
        super().__init__(model, config, caption_dropout=caption_dropout)
        if config.low_res_schedule is None or config.unet.num_classes is None:
            raise ValueError(f"{config.name}: an upscaler needs a low_res_schedule and a noise-level label embedding")
        if config.unet.num_classes <= config.max_noise_level:
            raise ValueError(f"{config.name}: noise levels 0..{config.max_noise_level} need as many class labels")
        self.low_res_schedule = config.low_res_schedule
        self.crop = crop
        self.low_res_filter = low_res_filter
        if zero_init_labels:
            with torch.no_grad():
                self.module.label_emb.weight.zero_()

    def condition(self, images: Tensor, draws: Draws) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if self.crop is not None:
            images = random_crop(images, self.crop, draws)
        f = self.config.vae.downsample
        if self.low_res_filter == "lanczos":
            low = lanczos_downsample(images, f)
        else:
            low = nn.functional.interpolate(images, scale_factor=1 / f, mode="bicubic", antialias=True)
        low = low.clamp(-1, 1)  # (b, 3, H/f, W/f): the latents' size
        level = draws.randint(self.config.max_noise_level + 1)
        noised = add_noise(low, draws.randn(*low.shape[1:]), level, self.low_res_schedule)
        return images, noised, level
