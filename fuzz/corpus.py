"""Seed corpora, written by the real libraries (never by stablekit's own writers), so the fuzzer starts from the
bytes users actually have: ``safetensors.torch.save_file``, ``torch.save`` (zip and legacy layouts), Python's
``zipfile`` re-compressing a torch archive, diffusers' ``save_pretrained`` and Pillow's encoders.

    python -m fuzz.corpus [--out fuzz/corpus] [TARGET ...]

writes ``<out>/<target>/<seed>`` for each target (default: all) and, for the diffusers target, the template folders
the fuzz target copies and mutates under ``<out>/diffusers-folders/``. Everything here is small (each seed under
64 kB but the folders' weights) and deterministic.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fuzz.targets import FOLDER_FILES, FOLDER_KINDS  # which folder files the diffusers target may change

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "corpus"
TARGETS = ("safetensors", "zip", "legacy", "diffusers", "image")


# --- safetensors --------------------------------------------------------------------------------------------------


def safetensors_seeds() -> dict[str, bytes]:
    from safetensors.torch import save as st_save

    from stablekit.config import SD1, SD2_V
    from stablekit.weights.detect import METADATA_KEY, config_to_json

    g = torch.Generator().manual_seed(0)
    mixed = {
        "f32": torch.randn(2, 3, generator=g),
        "f16": torch.randn(4, generator=g).half(),
        "bf16": torch.randn(1, 2, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(3),
        "i32": torch.arange(2, dtype=torch.int32),
        "i16": torch.arange(2, dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(3, generator=g).to(torch.float8_e5m2),
    }
    # Original-layout names, so that a probe gets as far as shape detection.
    sd_names = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 1, 1, dtype=torch.float16),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 1, 1, dtype=torch.float16),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 1, 1, dtype=torch.float16),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
        "betas": torch.linspace(0.00085, 0.012, 4, dtype=torch.float64),
        "scale_factor": torch.tensor(0.18215),
    }
    seeds = {
        "mixed_dtypes": st_save(mixed, metadata={"format": "pt"}),
        "zero_dim_and_empty": st_save(
            {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3), "empty_i": torch.zeros(0, dtype=torch.int64)}
        ),
        "single_no_metadata": st_save({"w": torch.ones(2, 2)}),
        "sd_names": st_save(sd_names, metadata={"format": "pt", "modelspec.title": "x"}),
        "stablekit_config_sd1": st_save(sd_names, metadata={METADATA_KEY: config_to_json(SD1), "format": "pt"}),
        "stablekit_config_sd2v": st_save({"w": torch.ones(1)}, metadata={METADATA_KEY: config_to_json(SD2_V)}),
        "only_metadata": st_save({}, metadata={"a": "b"}),
    }
    return seeds


# --- torch pickles ------------------------------------------------------------------------------------------------


def _state_dicts() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(2, 3, generator=g))
        linear.bias.zero_()
    return {
        "plain": {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g).half(), "n": torch.arange(4)},
        "dtypes": {
            "bf16": torch.randn(2, generator=g).bfloat16(),
            "f64": torch.randn(2, generator=g).double(),
            "bool": torch.tensor([True, False, True]),
            "i8": torch.tensor([-3, 4], dtype=torch.int8),
            "u8": torch.arange(3, dtype=torch.uint8),
            "c64": torch.randn(2, dtype=torch.complex64, generator=g),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4),
        },
        # Views of one storage: offsets, strides, a transpose.
        "views": {"base": base, "row": base[1], "col": base[:, 2], "t": base.t(), "tail": base.view(-1)[5:]},
        "parameter": {"p": torch.nn.Parameter(torch.randn(3, 2, generator=g)), "buf": torch.ones(2)},
        "ordered_module_state": linear.state_dict(),  # an OrderedDict with _metadata
        "ordered": OrderedDict([("a", torch.ones(2)), ("b", torch.zeros(1, 1))]),
        # The Lightning checkpoint layout SD .ckpt files have.
        "nested_state_dict": {
            "state_dict": {"model.w": torch.randn(2, 2, generator=g), "model.s": torch.tensor(1.0)},
            "global_step": 470000,
            "epoch": 6,
            "callbacks": {"cb": {"best": 0.5, "path": "x"}},
            "hparams": argparse.Namespace(lr=1e-4, name="sd"),
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
        },
        "non_tensor_values": {"w": torch.ones(1), "s": "text", "l": [1, 2.5, None], "t": (1, "a"), 3: torch.ones(1)},
        "module": linear,  # a pickled nn.Module: its class must stay a placeholder
        "not_a_dict": [torch.ones(2), torch.zeros(1)],
    }


def _torch_bytes(obj: object, **kw: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)  # type: ignore[arg-type]
    return buf.getvalue()


def _recompressed(raw: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def zip_seeds() -> dict[str, bytes]:
    seeds = {name: _torch_bytes(obj) for name, obj in _state_dicts().items()}
    seeds["plain_protocol4"] = _torch_bytes(_state_dicts()["plain"], pickle_protocol=4)
    seeds["plain_deflated"] = _recompressed(seeds["plain"])
    seeds["nested_deflated"] = _recompressed(seeds["nested_state_dict"])
    return seeds


def legacy_seeds() -> dict[str, bytes]:
    seeds = {
        name: _torch_bytes(obj, _use_new_zipfile_serialization=False)
        for name, obj in _state_dicts().items()
        if name != "views"  # legacy views of one storage still write it once: kept below
    }
    seeds["views"] = _torch_bytes(_state_dicts()["views"], _use_new_zipfile_serialization=False)
    seeds["plain_protocol4"] = _torch_bytes(
        _state_dicts()["plain"], _use_new_zipfile_serialization=False, pickle_protocol=4
    )
    return seeds


# --- images -------------------------------------------------------------------------------------------------------


def _gradient(mode: str, size: tuple[int, int] = (7, 5)) -> Image.Image:
    w, h = size
    rng = np.random.default_rng(0)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgba[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    rgba[..., 2] = rng.integers(0, 256, (h, w), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.3, 0, 255).astype(np.uint8)
    image = Image.fromarray(rgba)
    if mode == "I;16":
        arr = (rgba[..., 0].astype(np.uint16) << 8) | rgba[..., 2]
        return Image.fromarray(arr)  # uint16: "I;16"
    if mode == "P":
        return image.convert("RGB").quantize(8)
    return image.convert(mode)


def _encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    exif[0x010F] = "stablekit-fuzz"  # Make
    return exif


def image_seeds() -> dict[str, bytes]:
    seeds: dict[str, bytes] = {}
    for mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
        seeds[f"png_{mode.replace(';', '')}"] = _encoded(_gradient(mode), "PNG")
    p = _gradient("P")
    seeds["png_P_transparency"] = _encoded(p, "PNG", transparency=0)
    seeds["png_L_transparency"] = _encoded(_gradient("L"), "PNG", transparency=17)
    seeds["png_RGB_exif6"] = _encoded(_gradient("RGB"), "PNG", exif=_exif(6))
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt\nSteps: 20, Sampler: ddim")
    info.add_text("comp", "compressed " * 20, zip=True)
    info.add_itxt("intl", "ünïcode", lang="en", tkey="k")
    seeds["png_text_chunks"] = _encoded(_gradient("RGB"), "PNG", pnginfo=info)
    frames = [_gradient("RGBA"), _gradient("RGBA").transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    seeds["apng"] = _encoded(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50, loop=0)

    seeds["jpeg_RGB"] = _encoded(_gradient("RGB"), "JPEG", quality=80)
    seeds["jpeg_L"] = _encoded(_gradient("L"), "JPEG")
    seeds["jpeg_CMYK"] = _encoded(_gradient("CMYK"), "JPEG")
    seeds["jpeg_progressive_444"] = _encoded(_gradient("RGB", (17, 9)), "JPEG", progressive=True, subsampling=0)
    for orientation in (3, 6, 8):
        seeds[f"jpeg_exif{orientation}"] = _encoded(_gradient("RGB"), "JPEG", exif=_exif(orientation))
    seeds["jpeg_icc"] = _encoded(_gradient("RGB"), "JPEG", icc_profile=b"\0" * 128)

    seeds["webp_RGB"] = _encoded(_gradient("RGB"), "WEBP", quality=70)
    seeds["webp_RGBA_lossless"] = _encoded(_gradient("RGBA"), "WEBP", lossless=True)
    seeds["webp_exif6"] = _encoded(_gradient("RGB"), "WEBP", exif=_exif(6))
    seeds["webp_animated"] = _encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    return seeds


# --- diffusers folders --------------------------------------------------------------------------------------------


def _tiny_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """A transformers CLIPTokenizer with a handful of tokens (the reader ignores tokenizer files; the fuzzer should
    still see real ones)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["!", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def write_diffusers_folder(folder: Path, kind: str = "sd1") -> Path:
    """A tiny diffusers Stable Diffusion folder (``sd1``: txt2img; ``x4``: the upscaler layout, with
    ``low_res_scheduler`` and ``max_noise_level``), written by diffusers' ``save_pretrained`` from the shapes of
    diffusers' own fast-test fixtures (see tests/test_tasks_parity.py), narrowed to keep it near 1 MB."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        # diffusers' deprecation notes on the fixtures' scheduler and x4 VAE configs, which we keep as written
        warnings.simplefilter("ignore", FutureWarning)
        return _write_diffusers_folder(folder, kind)


def _write_diffusers_folder(folder: Path, kind: str) -> Path:
    import diffusers
    import transformers

    torch.manual_seed(0)
    openclip = kind == "x4"
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=32,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=77,
            **({"hidden_act": "gelu", "projection_dim": 32} if openclip else {}),
        )
    )
    levels = [32, 32, 64] if openclip else [32, 64]
    vae = diffusers.AutoencoderKL(
        block_out_channels=levels,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        latent_channels=4,
        layers_per_block=1,
    )
    common = {"block_out_channels": levels, "layers_per_block": 1, "sample_size": 8, "cross_attention_dim": 32}
    tmp = Path(tempfile.mkdtemp(prefix="stablekit-tokenizer-"))
    try:
        tokenizer = _tiny_tokenizer(tmp)
        if openclip:
            unet = diffusers.UNet2DConditionModel(
                in_channels=7,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8,
                use_linear_projection=True,
                only_cross_attention=(True, True, False),
                num_class_embeds=100,
                **common,
            )
            pipe = diffusers.StableDiffusionUpscalePipeline(
                vae=vae,
                text_encoder=text,
                tokenizer=tokenizer,
                unet=unet,
                low_res_scheduler=diffusers.DDPMScheduler(),
                scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
                max_noise_level=350,
            )
        else:
            unet = diffusers.UNet2DConditionModel(
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                **common,
            )
            pipe = diffusers.StableDiffusionPipeline(
                vae=vae,
                text_encoder=text,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=diffusers.PNDMScheduler(skip_prk_steps=True),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.save_pretrained(folder, safe_serialization=True)
        if not openclip:
            # transformers 5 saves tokenizer.json only; the released Hub folders have vocab.json + merges.txt (which
            # the reader prefers): sd1 gets both layouts, x4 keeps tokenizer.json alone.
            # The `tokenizers` library's own BPE writer (transformers 5 has no save_vocabulary for it).
            tokenizer.backend_tokenizer.model.save(str(folder / "tokenizer"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def diffusers_seeds(folders: dict[str, Path]) -> dict[str, bytes]:
    """One seed per (folder kind, file): the selector byte (see :func:`fuzz.targets.diffusers_folder`), then the
    file's bytes as diffusers wrote them."""
    seeds: dict[str, bytes] = {}
    for k, kind in enumerate(FOLDER_KINDS):
        if kind not in folders:
            continue
        for i, name in enumerate(FOLDER_FILES):
            path = folders[kind] / name
            if path.is_file():
                seeds[f"{kind}_{name.replace('/', '_')}"] = bytes([k << 6 | i]) + path.read_bytes()
    return seeds


# --- command line -------------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[], dict[str, bytes]]] = {
    "safetensors": safetensors_seeds,
    "zip": zip_seeds,
    "legacy": legacy_seeds,
    "image": image_seeds,
}


def folders_in(out: Path) -> dict[str, Path]:
    return {kind: out / "diffusers-folders" / kind for kind in FOLDER_KINDS}


def build(target: str, out: Path = DEFAULT_OUT) -> Path:
    """Write ``out/target/`` (and the diffusers template folders); returns the seed folder."""
    dest = out / target
    if target == "diffusers":
        folders = folders_in(out)
        for kind, folder in folders.items():
            if not (folder / "model_index.json").is_file():
                write_diffusers_folder(folder, kind)
        seeds = diffusers_seeds(folders)
    else:
        seeds = _BUILDERS[target]()
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (dest / f"seed-{name}").write_bytes(data)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"any of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}: choose from {', '.join(TARGETS)}")
    for target in args.targets or TARGETS:
        dest = build(target, args.out)
        print(f"{target}: {len(os.listdir(dest))} files in {dest}")


if __name__ == "__main__":
    main()
