"""The OpenVINO engine: our own modules, converted by ``openvino.convert_model`` and run by its CPU plugin.

Only the four networks change hands; tokenizer, samplers, guidance, seeds and tiling stay the pipeline's, so an
image is the same image as the torch engine's up to arithmetic. Every input is dynamic (batch, latent size,
context length), so one converted UNet serves every request.

Precision is explicit. OpenVINO's CPU plugin silently computes in bf16 where the CPU has it (AVX-512 BF16, AMX),
which moved a UNet step by up to 3e-2 here; ``f32`` pins full precision, ``bf16`` asks for the fast path knowingly.

Two findings shape the cache (:mod:`stablekit.engines.cache`):

- ``openvino.save_model`` compresses weights to fp16 by default. A model read back from such a file differs from
  the converted one by 4e-3 per UNet step at f32 (4.6e-6 without compression), so parts are saved uncompressed.
- The plugin's compiled blobs (its ``CACHE_DIR``) make a second process start in seconds: here the SD 2 UNet
  compiled in 6.5 s from the converted files and imported in 0.8 s from its blob at f32, and its first step fell
  from 5.6 s to 3.1 s. A blob written at one precision and imported at another crashed the process, so blobs sit
  in a folder per precision and CPU (flags and model), with a manifest of digests checked before use.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import stablekit
from stablekit.config import ModelConfig
from stablekit.engines import EngineName, EngineUnavailable, Precision
from stablekit.engines.cache import ModelCache
from stablekit.models.clip import layers_run
from stablekit.models.ldm import LatentDiffusion

INSTALL_HINT = "the OpenVINO engine needs the openvino package: pip install 'stablekit[openvino]'"
UNET, VAE_ENCODER, VAE_DECODER = "unet", "vae_encoder", "vae_decoder"
Report = Callable[[str], None]


def require_openvino() -> Any:
    """The ``openvino`` module, or a RuntimeError saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise EngineUnavailable(INSTALL_HINT) from e
    return openvino


def text_part(skip: int) -> str:
    return f"text_skip{skip}"


def parts_for(skip: int) -> tuple[str, ...]:
    return (UNET, VAE_DECODER, VAE_ENCODER, text_part(skip))


# --- the modules as OpenVINO sees them: positional tensors in, one tensor out ------------------------------


class _UNet(nn.Module):
    def __init__(self, model: LatentDiffusion) -> None:
        super().__init__()
        self.unet = model.model.diffusion_model

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, t, context, y)


class _Text(nn.Module):
    def __init__(self, model: LatentDiffusion, skip: int) -> None:
        super().__init__()
        self.encoder, self.skip = model.cond_stage_model, skip

    def forward(self, ids: Tensor) -> Tensor:
        return self.encoder(ids, skip=self.skip)


class _Call(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor], owner: nn.Module) -> None:
        super().__init__()
        self.owner, self.fn = owner, fn  # owner registers the weights; fn is its bound method

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _example(config: ModelConfig, part: str) -> tuple[Tensor, ...]:
    """The inputs a part is traced with. The shapes only seed the trace, every axis stays dynamic; the latent side
    is a multiple of 2^levels so every down- and up-sampling is exact."""
    u, f = config.unet, config.vae.downsample
    side = 2 ** len(u.channel_mult) * 2
    if part == UNET:
        x = torch.randn(2, u.in_channels, side, side)
        t = torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, config.text.context_length, u.context_dim)
        return (x, t, ctx) if u.num_classes is None else (x, t, ctx, torch.tensor([20, 20]))
    if part == VAE_DECODER:
        return (torch.randn(1, config.vae.embed_dim, side, side),)
    if part == VAE_ENCODER:
        return (torch.rand(1, 3, side * f, side * f) * 2 - 1,)
    return (torch.full((2, config.text.context_length), config.text.pad_token, dtype=torch.long),)


def _module(model: LatentDiffusion, part: str) -> nn.Module:
    if part == UNET:
        return _UNet(model)
    if part == VAE_DECODER:
        return _Call(model.first_stage_model.decode, model.first_stage_model)
    if part == VAE_ENCODER:
        return _Call(model.first_stage_model.moments, model.first_stage_model)
    return _Text(model, int(part.removeprefix("text_skip")))


def convert_part(model: LatentDiffusion, config: ModelConfig, part: str, folder: Path) -> None:
    """Trace ``part`` of ``model`` (float32, CPU) and save it to ``folder/model.xml`` + ``model.bin``, weights
    uncompressed."""
    ov = require_openvino()
    example = _example(config, part)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about the input checks (token range, causal shapes): they run in Python at trace time
        # and are left out of the graph, which is why OpenVINOEngine checks inputs itself before each call.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # convert_model traces with TorchScript, which torch now marks deprecated; its trace is what we test.
        warnings.simplefilter("ignore", DeprecationWarning)
        converted = ov.convert_model(_module(model, part).eval(), example_input=example)
    ov.save_model(converted, folder / "model.xml", compress_to_fp16=False)


# --- what the compiled blobs depend on ------------------------------------------------------------------


def cpu_fingerprint() -> str:
    """The CPU's model name and instruction-set flags, hashed: a blob compiled for one CPU is never run on
    another (the plugin picks kernels by instruction set at compile time)."""
    name, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            if key.strip() == "flags":
                flags = " ".join(sorted(value.split()))
                break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()}|{name}|{flags}".encode()).hexdigest()[:12]


def source_digest() -> str:
    """The source of every module that shapes a converted graph: editing a model invalidates old conversions."""
    root = Path(stablekit.__file__).parent
    h = hashlib.sha256()
    for f in sorted([*root.glob("models/*.py"), *root.glob("nn/*.py"), Path(__file__)]):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def cpu_supports(precision: Precision) -> str | None:
    """Why this CPU cannot run ``precision`` (None when it can), from the plugin's own capability list."""
    if precision == "f32":
        return None
    ov = require_openvino()
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        return f"this CPU has no bf16 support (OpenVINO reports {', '.join(caps)}); use --precision f32"
    return None


# --- the engine -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildInfo:
    key: str
    converted: tuple[str, ...]  # parts converted in this process (empty: all came from the cache)
    cache_bytes: int  # what this model's entry holds on disk
    folder: Path


class OpenVINOEngine:
    """Compiled networks of one model at one precision; thread-safe (one infer request per call)."""

    name: EngineName = "openvino"

    def __init__(self, compiled: dict[str, Any], config: ModelConfig, precision: Precision, info: BuildInfo) -> None:
        self._compiled = compiled
        self.config = config
        self.precision = precision
        self.info = info

    def _run(self, part: str, *inputs: Tensor) -> Tensor:
        request = self._compiled[part].create_infer_request()
        arrays = [t.detach().to("cpu").contiguous().numpy() for t in inputs]
        request.infer(arrays)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def text(self, ids: Tensor, skip: int) -> Tensor:
        layers_run(self.config.text, ids, skip)  # the traced graph holds no input checks
        part = text_part(skip)
        if part not in self._compiled:
            raise ValueError(f"this OpenVINO pipeline was built for clip skip {self._text_skip + 1}, not {skip + 1}")
        return self._run(part, ids.long())

    @property
    def _text_skip(self) -> int:
        return next(int(p.removeprefix("text_skip")) for p in self._compiled if p.startswith("text_skip"))

    def unet(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
        if (y is None) != (self.config.unet.num_classes is None):
            raise ValueError("class labels y must be given exactly when the UNet has num_classes")
        t = t.float().reshape(-1).expand(x.shape[0])
        inputs = (x.float(), t, context.float()) if y is None else (x.float(), t, context.float(), y.long())
        return self._run(UNET, *inputs).to(x.dtype)

    def moments(self, pixels: Tensor) -> Tensor:
        return self._run(VAE_ENCODER, pixels.float())

    def decode(self, z: Tensor) -> Tensor:
        return self._run(VAE_DECODER, z.float())

    def decode_fp32(self, z: Tensor) -> Tensor:
        return self.decode(z)  # inputs and outputs are float32 already; bf16 keeps float32's range

    def describe(self) -> str:
        ov = require_openvino()
        return f"openvino {ov.__version__.split('-')[0]} CPU, {self.precision}"


def build_engine(
    config: ModelConfig,
    sources: list[Path],
    facts: dict[str, object],
    load: Callable[[], LatentDiffusion],
    *,
    skip: int,
    precision: Precision,
    cache_dir: Path,
    report: Report | None = None,
) -> OpenVINOEngine:
    """Compile the model's networks, converting (through ``load()``) only the parts the cache lacks.

    ``sources`` are the weights files the model is read from and ``facts`` everything else the conversion
    depends on (loading options, the config); together they key the cache entry. The torch model ``load()``
    returns is dropped before compiling, so the process never holds it and the compiled networks at once.
    """
    ov = require_openvino()
    problem = cpu_supports(precision)
    if problem:
        raise ValueError(problem)
    say: Report = report or (lambda _msg: None)
    cache = ModelCache(cache_dir, "openvino")
    cache.check_usable()
    key = cache.key(
        sources, {**facts, "stablekit": stablekit.__version__, "source": source_digest(), "openvino": ov.__version__}
    )
    wanted = parts_for(skip)
    missing = {}
    for part in wanted:
        why = cache.problem(cache.part(key, part))
        if why is not None:
            missing[part] = why
    if missing:
        damaged = [f"{p} ({w})" for p, w in missing.items() if w != "not built yet"]
        if damaged:
            say(f"rebuilding cached OpenVINO parts: {'; '.join(damaged)}")
        _convert(load(), config, missing, cache, key, say)  # the torch model lives only for this call
        # Tracing leaves reference cycles that hold the torch weights (the whole mapped checkpoint: 5 GB of RSS
        # for SD 2) until a collection runs; collect now, before the compiled networks take their memory.
        gc.collect()
        cache.clear_compiled(key)  # blobs compiled from the replaced parts are stale
    compiled = _compile(ov, cache, key, wanted, precision)
    info = BuildInfo(key, tuple(missing), cache.size(key), cache.engine_root / key)
    return OpenVINOEngine(compiled, config, precision, info)


def _convert(
    model: LatentDiffusion, config: ModelConfig, parts: dict[str, str], cache: ModelCache, key: str, say: Report
) -> None:
    for part in parts:
        say(f"converting the {part.replace('_', ' ')} for OpenVINO (once; cached under {cache.engine_root})")
        cache.store(cache.part(key, part), functools.partial(convert_part, model, config, part))


def _compile(ov: Any, cache: ModelCache, key: str, parts: tuple[str, ...], precision: Precision) -> dict[str, Any]:
    """Compile every part, through the plugin's blob cache in a folder of this precision and CPU, whose files are
    checked against the digests recorded when they were written (a damaged blob is removed, never imported)."""
    blobs = cache.compiled_dir(key, f"{precision}-{cpu_fingerprint()}")
    manifest = blobs / "blobs.json"
    _drop_unverified(cache, blobs, manifest)
    core = ov.Core()
    core.set_property({"CACHE_DIR": str(blobs)})
    settings = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    compiled = {part: core.compile_model(str(cache.part(key, part) / "model.xml"), "CPU", settings) for part in parts}
    recorded = {p.name: cache.memo.digest(p) for p in sorted(blobs.iterdir()) if p.is_file() and p != manifest}
    manifest.write_text(json.dumps(recorded))
    return compiled


def _drop_unverified(cache: ModelCache, blobs: Path, manifest: Path) -> None:
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        recorded = {}
    for f in blobs.iterdir():
        if f == manifest or not f.is_file():
            continue
        if not isinstance(recorded, dict) or recorded.get(f.name) != cache.memo.digest(f):
            f.unlink(missing_ok=True)
