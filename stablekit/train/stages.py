"""What is trained, and how its loss is computed: the KL autoencoder, CLIP and the latent-diffusion UNet.

A :class:`Stage` owns its trainable ``module`` (and any frozen networks beside it), computes the loss of one
micro-batch and, at the end, exports the averaged weights as the file the next stage or a user loads. The loop
in :mod:`stablekit.train.trainer` is the same for all three.

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
    """Base of the three stages. ``loss`` returns (what to backpropagate, this process's share of the logged
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


# --- KL autoencoder ------------------------------------------------------------------------------------------


class VAEStage(Stage):
    """Reconstruction (L1 or MSE) plus a small KL term towards N(0, I), per latent element.

    The adversarial and perceptual (LPIPS) losses of the released autoencoder are left out: the demo's flat
    shapes reconstruct well without them, and LPIPS would need pretrained VGG weights.
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
    ) -> None:
        self.config = config
        self.kl_weight = kl_weight
        self.recon = recon
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
        post = self.module.encode(images)
        z = post.mean + post.std * Draws(ctx).randn(*post.mean.shape[1:]).to(post.mean.dtype)
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
    teaches the unconditional prediction that classifier-free guidance needs."""

    name = "unet"
    module: UNetModel

    def __init__(self, model: LatentDiffusion, config: ModelConfig, *, caption_dropout: float = 0.1) -> None:
        if config.conditioning != "txt2img":
            raise ValueError(f"the trainer trains text-to-image UNets; {config.name} is {config.conditioning}")
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

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[Tensor, Tensor]:
        images, captions = batch
        draws = Draws(ctx)
        with torch.no_grad():
            post = self.model.first_stage_model.encode(images.to(ctx.device))
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
        pred = self.module(x_t, t.float(), context).float()
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
