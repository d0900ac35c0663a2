"""What every pipeline shares: a loaded model on a device with its settings, and the model calls (prompt
encoding, the UNet, image encoding and decoding) the tasks compose.

Settings (device, dtype, attention backend, tiling) belong to the :class:`Pipeline`, never to a module global:
a server runs several pipelines, or several requests on one, in one process. Each model call puts the
pipeline's attention backend in force for its own duration (a context variable), and no call changes the
shared model (the fp16 decode fallback works on a private fp32 copy), so concurrent calls cannot race.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from stablekit import __version__
from stablekit.config import ModelConfig, Prediction
from stablekit.diffusion.noise import Generator
from stablekit.engines import ENGINES, PRECISIONS, Engine, EngineName, Precision
from stablekit.engines.eager import TorchEngine
from stablekit.models.ldm import LatentDiffusion
from stablekit.models.vae import DiagonalGaussian
from stablekit.nn.attention import BACKENDS, Backend, attention_backend
from stablekit.nn.tiling import tiled
from stablekit.pipelines.params import Limits
from stablekit.prompts.weighting import encode_prompts, tokenize_weighted
from stablekit.safety import SafetyAction, SafetyChecker
from stablekit.text.tokenizer import CLIPTokenizer, default_tokenizer
from stablekit.watermark import Watermarker
from stablekit.weights.lora import Lora

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinity; raised instead of writing a black image."""


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The device to run on, checked: an unknown name or a device this machine lacks is a ValueError that says
    so, rather than torch's error from deep inside the first allocation."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (or this torch has no CUDA)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs here have no native half-precision matmul (bf16 measured ~30x slower than fp32): fp32 is the CPU default.
    return torch.float16 if device.type == "cuda" else torch.float32


class Pipeline:
    """A model's engine (its networks: a :class:`LatentDiffusion` run by torch, or the same networks compiled by
    another engine, see :mod:`stablekit.engines`), its family config, the device/dtype it runs in and its settings.

    ``attention`` picks the attention backend (``"sliced"`` trades speed for memory). ``vae_tile`` and
    ``unet_tile`` are latent sizes above which the autoencoder's decode and the x4 upscaler's UNet run in
    overlapping tiles, so large images fit in memory.

    ``tokenizer`` is the model's own (a diffusers folder's ``tokenizer/``; default: the built-in CLIP one), checked
    against the text encoder here, before anything runs. ``clip_skip`` counts as A1111 does: 1 is the family's own
    text output, N stops N - 1 layers before it, the final LayerNorm still applied (diffusers' ``clip_skip=k`` is
    our k + 1). SD1's own output is its last layer (2 = the penultimate); SD2's is already its penultimate layer
    (1 = layer 23 of 24, 2 = layer 22, which A1111, ignoring clip skip for SD2, never gives). It applies to the
    negative prompt too, as in A1111; diffusers' pipelines encode the negative prompt without it.

    ``prompt_weighting`` reads prompts in A1111's language (``(word:1.3)``, ``[word]``, ``BREAK``); off, the text is
    literal. Either way a prompt longer than the encoder's window is encoded in 75-token chunks, as A1111 does
    (diffusers cuts it at 77 tokens).
    """

    def __init__(
        self,
        model: LatentDiffusion | Engine,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "model",
        notes: Sequence[str] = (),
        attention: Backend = "sdpa",
        slice_size: int | None = None,
        vae_tile: int = 128,
        unet_tile: int = 128,
        limits: Limits | None = None,
        tokenizer: CLIPTokenizer | None = None,
        clip_skip: int = 1,
        prompt_weighting: bool = True,
    ) -> None:
        if attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of {', '.join(BACKENDS)}")
        text = config.text
        self.tokenizer = tokenizer or default_tokenizer()
        problem = self.tokenizer.mismatch(
            vocab_size=text.vocab_size, context_length=text.context_length, pad_token=text.pad_token
        )
        if problem:
            raise ValueError(f"{problem}: the tokenizer does not fit this model")
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= text.layers_used:
            raise ValueError(f"clip skip must be an integer in 1..{text.layers_used} for this model, got {clip_skip!r}")
        self.clip_skip = clip_skip
        self.prompt_weighting = prompt_weighting
        self.device = resolve_device(device)
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        if isinstance(model, LatentDiffusion):
            self.engine: Engine = TorchEngine(
                model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
            )
        elif self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"the {model.name} engine runs on the CPU in float32 (its precision is its own setting)")
        else:
            self.engine = model
        self.config = config
        self.name = name
        # What loading assumed or skipped: the caller reports these once, after loading.
        self.notes = list(notes)
        self.version = __version__
        self.attention: Backend = attention
        self.slice_size = slice_size
        self.vae_tile = vae_tile
        self.unet_tile = unet_tile
        self.limits = limits or Limits()
        # LoRAs (stablekit.pipelines.networks): the pipeline's own, merged for every run, and the folder in which
        # a prompt's <lora:NAME> tags are looked up.
        self.loras: list[tuple[Lora, float]] = []
        self.lora_dir: Path | None = None
        # The safety checker run on every decoded image (stablekit.safety), and what a flagged image becomes:
        # "blackout" (diffusers' behaviour: a black image) or "flag" (kept, and reported as flagged).
        self.safety_checker: SafetyChecker | None = None
        self.safety_action: SafetyAction = "blackout"
        # The reference scripts' invisible watermark (stablekit.watermark), applied after the safety checker as
        # they apply it; off unless asked for, since it needs an optional package and 256 px images.
        self.watermark: Watermarker | None = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        prediction: Prediction | None = None,
        attention: Backend = "sdpa",
        limits: Limits | None = None,
        ema: bool = False,
        vae: str | Path | None = None,
        clip_skip: int = 1,
        variant: str | None = None,
        engine: EngineName = "torch",
        precision: Precision = "f32",
        cache_dir: str | Path | None = None,
        report: Callable[[str], None] | None = None,
        prompt_weighting: bool = True,
    ) -> Pipeline:
        """Load ``path`` (see :func:`stablekit.weights.load_model`; ``ema``, ``vae`` and ``variant`` are passed on:
        the UNet's EMA weights, a separate autoencoder in place of the file's own, a diffusers folder's variant).

        ``engine="openvino"`` runs the networks with OpenVINO on the CPU at ``precision`` (``"f32"``, or ``"bf16"``
        where the CPU has it), converting them once into ``cache_dir`` (default: the user's cache folder);
        ``report`` hears about the slow steps (a conversion) as they start."""
        from stablekit.weights import Probe, load_model

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        dev = resolve_device(device)
        found: Probe
        networks: LatentDiffusion | Engine
        if engine == "openvino":
            if dev.type != "cpu" or dtype not in (None, torch.float32):
                raise ValueError("--engine openvino runs on the CPU in fp32; its arithmetic is set by --precision")
            from stablekit.pipelines.openvino import load_openvino

            dt = torch.float32
            found, networks = load_openvino(
                path, prediction, ema, vae, variant, clip_skip, precision, cache_dir=cache_dir, report=report
            )
        else:
            if precision != "f32":
                raise ValueError("--precision is a setting of --engine openvino; the torch engine takes --dtype")
            dt = dtype if dtype is not None else default_dtype(dev)
            loaded = load_model(path, prediction=prediction, dtype=dt, device=dev, ema=ema, vae=vae, variant=variant)
            found, networks = loaded, loaded.model
        return cls(
            networks,
            found.config,
            device=dev,
            dtype=dt,
            name=Path(path).stem,
            notes=found.notes,
            attention=attention,
            limits=limits,
            tokenizer=found.tokenizer,
            clip_skip=clip_skip,
            prompt_weighting=prompt_weighting,
        )

    @property
    def model(self) -> LatentDiffusion:
        """The torch modules, for code that works on them directly (the torch engine only)."""
        if isinstance(self.engine, TorchEngine):
            return self.engine.model
        raise RuntimeError(f"this pipeline runs on the {self.engine.name} engine, which holds no torch modules")

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with torch.inference_mode(), attention_backend(self.attention, slice_size=self.slice_size):
            yield

    def encode_prompts(
        self, prompts: Sequence[str], negatives: Sequence[str] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Prompts (and negative prompts) -> contexts (B, 77·k, D) at the pipeline's clip skip, both with the same
        chunk count k: A1111's prompt language (weights, ``BREAK``, 75-token chunks; see
        :mod:`stablekit.prompts.weighting`), or the literal text in chunks without ``prompt_weighting``."""
        text = self.config.text

        def encode(ids: Tensor) -> Tensor:  # (N, 77) -> (N, 77, D)
            with self._running():
                return self.engine.text(ids.to(self.device), self.clip_skip - 1)

        both = [*prompts, *(negatives or ())]
        context, _ = encode_prompts(
            both,
            self.tokenizer,
            encode,
            pad_token=text.pad_token,
            weighting=self.prompt_weighting,
            context_length=self.tokenizer.max_length or text.context_length,
        )
        context = context.to(self.dtype)
        return context[: len(prompts)], None if negatives is None else context[len(prompts) :]

    def prompt_chunks(self, texts: Sequence[str]) -> int:
        """How many 75-token chunks the longest of ``texts`` takes (what a merged batch pads every prompt to)."""
        text = self.config.text
        return tokenize_weighted(
            texts,
            self.tokenizer,
            pad_token=text.pad_token,
            weighting=self.prompt_weighting,
            context_length=self.tokenizer.max_length or text.context_length,
        ).chunks

    def unet(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """The raw UNet call the samplers drive: (N, C_in, h, w), (N,), (N, 77, D), class labels (N,) -> ε or v."""
        with self._running():
            return self.engine.unet(x, t, context, y)

    def encode(self, pixels: Tensor, generator: Generator = None, *, sample: bool = True) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f) scaled for diffusion.

        With ``sample`` the latent is a draw from the posterior, one draw per image from its own generator when
        given a list (as diffusers' ``retrieve_latents`` draws it, in the model's dtype); otherwise its mean.
        """
        with self._running():
            posterior = DiagonalGaussian(self.engine.moments(pixels.to(self.device, self.dtype)))
            z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.config.vae.scale_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1], float32; tiled above ``vae_tile``.

        In half precision the decoder can overflow on some latents; then it is re-run in fp32 (the VAE is small
        next to the UNet) on a private copy, rather than returning a black image. A NaN in the latents
        themselves is an error.
        """
        if not torch.isfinite(latents).all():
            hint = "; try --dtype fp32 (or bf16 on GPU)" if self.dtype != torch.float32 else ""
            raise NonFiniteError(f"the sampler produced NaN/inf latents in {self.dtype}{hint}")
        z = latents / self.config.vae.scale_factor
        with self._running():
            pixels = self._decode_with(self.engine.decode, z.to(self.dtype))
            if not torch.isfinite(pixels).all() and self.dtype != torch.float32:
                pixels = self._decode_with(self.engine.decode_fp32, z.float())
        if not torch.isfinite(pixels).all():
            raise NonFiniteError("the autoencoder produced NaN/inf pixels; the weights may be corrupt")
        return pixels.float()

    def _decode_with(self, decode: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
        if max(z.shape[-2:]) > self.vae_tile:
            # the autoencoder's own tiling (AutoencoderKL.decode_tiled), over whichever engine decodes
            f = self.config.vae.downsample
            return tiled(decode, z, z.shape[-2:], self.vae_tile, self.vae_tile // 4, in_scale=1, out_scale=f)
        return decode(z)
