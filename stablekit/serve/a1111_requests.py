"""AUTOMATIC1111 requests -> the pipeline call they mean, or a 400 naming the field that asks for something this
server cannot do. A field is honoured, or neutral (its value changes nothing, or A1111 itself ignores it in this
request), or refused: never silently dropped.

What is refused, and why it cannot be honoured here: hires fix, face restoration, tiling, variation seeds and
seed resizing, prompt styles, refiners, scripts and always-on scripts (ControlNet, ADetailer, ...), ``infotext``,
saving to disk, guidance below 1 (A1111 extrapolates towards the negative prompt there; this package runs the
prompt alone), and the parts of A1111's prompt language this package does not read (prompt editing
``[from:to:when]``, alternation ``[a|b]``, ``AND``, extra networks other than ``<lora:NAME:WEIGHT>``), which would
otherwise be read as text. Emphasis (``(word:1.2)``, ``[word]``), escaped brackets, ``BREAK``, prompts of any length
and LoRA tags (looked up in the server's ``--lora-dir``) are read as A1111 reads them.

Inpainting (``mask`` given) runs on the whole picture, with the masked area starting from the original image
(``inpaint_full_res`` false, ``inpainting_fill`` 1); the mask is taken, inverted and blurred as A1111 takes it,
then binarised at half, as A1111's default ``mask_round`` does. The unmasked area comes back through the
autoencoder rather than pasted from the input.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from stablekit.images import resized, to_rgb
from stablekit.pipelines import Event, GenerationParams, Pipeline, inpaint
from stablekit.pipelines.params import MAX_SEED
from stablekit.serve.a1111_samplers import Choice, choose, sampler_settings
from stablekit.serve.a1111_schema import Img2ImgRequest, Processing, Txt2ImgRequest
from stablekit.serve.jobs import Runner
from stablekit.serve.tasks import Inputs, runner
from stablekit.serve.wire import ApiError, image_field

MAX_MASK_BLUR = 64  # A1111's interface stops there; the kernel grows with it
_EXTRA_NETWORK = re.compile(r"<\w+:[^>]+>")
# [from:to:when], [to:when], [a|b]: square brackets holding an unescaped ':' or '|' (emphasis brackets hold neither)
_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*?(?<!\\)[:|][^\[\]]*\]")
_AND = re.compile(r"\bAND\b")
# Settings that change neither the images nor the answer here (where A1111 saves files, how it shows previews).
_HARMLESS_PREFIXES = ("outdir_", "save_", "grid_", "samples_filename", "directories_", "live_preview", "show_progress")
_HARMLESS = {"samples_save", "save_txt", "export_for_4chan", "jpeg_quality", "webp_lossless", "sd_checkpoint_cache"}


@dataclass(frozen=True)
class Plan:
    """A checked request: the job to queue and what the answer's ``info`` reports about it."""

    task: str  # "txt2img", "img2img" or "inpaint"
    params: GenerationParams
    run: Runner
    choice: Choice
    extra: dict[str, Any]  # A1111's extra_generation_params


def refuse(field: str, why: str) -> ApiError:
    return ApiError(400, f"{field}: {why}")


def current_options(pipe: Pipeline) -> dict[str, Any]:
    """``GET /sdapi/v1/options``: A1111's settings that bear on the images, as they are here (fixed per server)."""
    return {
        "sd_model_checkpoint": pipe.name,
        "CLIP_stop_at_last_layers": pipe.clip_skip,
        "eta_noise_seed_delta": 0,
        "eta_ddim": 0.0,
        "eta_ancestral": 1.0,
        "s_churn": 0.0,
        "s_tmin": 0.0,
        "s_tmax": 0.0,
        "s_noise": 1.0,
        "s_min_uncond": 0.0,
        "initial_noise_multiplier": 1.0,
        "img2img_fix_steps": False,
        "face_restoration": False,
        "tiling": False,
        "return_grid": False,  # A1111 puts a grid first for batches; this server never does
        "samples_format": "png",
        "enable_pnginfo": True,
    }


def check_setting(pipe: Pipeline, key: str, value: Any, where: str) -> None:
    """A setting a client may "set": its current value, or one that changes nothing here."""
    now = current_options(pipe)
    if key in now and _same(value, now[key]):
        return
    if key == "sd_model_checkpoint" and isinstance(value, str) and _checkpoint_name(value) == pipe.name:
        return
    if key in _HARMLESS or key.startswith(_HARMLESS_PREFIXES):
        return
    if key in now:
        raise refuse(where, f"cannot be changed on this server (it is {now[key]!r}); got {value!r}")
    raise refuse(where, "is not a setting this server can change")


def _checkpoint_name(title: str) -> str:
    """A1111's checkpoint title ("dir/name.safetensors [hash]") -> "name", the way this server names its model."""
    name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", title.strip()).replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"\.(safetensors|ckpt|pt|pth|bin)$", "", name, flags=re.IGNORECASE)


def _same(a: Any, b: Any) -> bool:
    """Equal as settings: booleans only to booleans (``1 == True`` in Python)."""
    return a is b if isinstance(a, bool) or isinstance(b, bool) else bool(a == b)


def _plain(text: str | None, field: str, *, split_and: bool) -> str:
    """A prompt in the part of A1111's language this package reads (emphasis, ``BREAK``, any length), or a 400
    for the parts it would read as text: extra networks, prompt editing and alternation, ``AND``."""
    text = text or ""
    network = _EXTRA_NETWORK.search(text)
    if network and not split_and:
        # A1111 reads extra networks in the prompt only; in a negative prompt they would be drawn as text.
        raise refuse(field, f"extra networks ({network.group()}) belong in the prompt")
    editing = _EDITING.search(text)
    if editing:
        raise refuse(field, f"A1111's prompt editing/alternation ({editing.group()!r}) is not supported here")
    if split_and and _AND.search(text):
        raise refuse(field, "A1111's AND keyword (composable diffusion) is not supported here")
    return text


def _neutral(req: Processing) -> None:
    """The fields both tasks refuse unless they hold a value that changes nothing."""
    if req.styles:
        raise refuse("styles", "prompt styles are not available here; put their text in the prompt")
    if req.subseed_strength:
        raise refuse("subseed_strength", "variation seeds are not available here; send 0")
    w, h = req.seed_resize_from_w or -1, req.seed_resize_from_h or -1
    if w > 0 and h > 0 and (w, h) != (req.width, req.height):
        raise refuse("seed_resize_from_w", "resizing the seed's noise is not available here; send -1")
    for field in ("restore_faces", "tiling", "save_images"):
        if getattr(req, field):
            raise refuse(field, "not available on this server; send false")
    if req.s_min_uncond:
        raise refuse("s_min_uncond", "skipping the unconditional pass is not available here; send 0")
    if req.refiner_checkpoint not in (None, "", "None", "none"):
        raise refuse("refiner_checkpoint", "refiners are not available here")
    if req.firstpass_image:
        raise refuse("firstpass_image", "hires fix is not available here")
    if req.script_name:
        raise refuse("script_name", f"no script {req.script_name!r} here (GET /sdapi/v1/scripts lists none)")
    for name in req.alwayson_scripts or {}:
        raise refuse(f"alwayson_scripts.{name}", "no always-on scripts are installed on this server")
    if req.infotext:
        raise refuse("infotext", "not read here; send the fields themselves")
    if req.cfg_scale is not None and req.cfg_scale < 1:
        raise refuse(
            "cfg_scale", f"below 1 is not available here (this package then runs the prompt alone), got {req.cfg_scale}"
        )


def _params(pipe: Pipeline, req: Processing) -> tuple[GenerationParams, Choice]:
    _neutral(req)
    for key, value in (req.override_settings or {}).items():
        check_setting(pipe, key, value, f"override_settings.{key}")
    for field in ("batch_size", "n_iter", "steps"):  # the pipeline's own message names them otherwise
        value = getattr(req, field)
        if value is not None and value < 1:
            raise refuse(field, f"must be at least 1, got {value}")
    prompt = _plain(req.prompt, "prompt", split_and=True)
    negative = _plain(req.negative_prompt, "negative_prompt", split_and=False)
    choice = choose(req.sampler_name or req.sampler_index, req.scheduler)
    options = sampler_settings(choice, eta=req.eta, s_churn=req.s_churn, s_noise=req.s_noise)
    params = GenerationParams(
        prompt,
        negative,
        width=512 if req.width is None else req.width,
        height=512 if req.height is None else req.height,
        steps=50 if req.steps is None else req.steps,
        guidance_scale=7.0 if req.cfg_scale is None else req.cfg_scale,
        seed=None if req.seed in (None, -1) else req.seed,
        batch_size=1 if req.batch_size is None else req.batch_size,
        batch_count=1 if req.n_iter is None else req.n_iter,
        sampler=choice.ours,
        sampler_options=options,
    )
    return params, choice


def plan_txt2img(pipe: Pipeline, req: Txt2ImgRequest) -> Plan:
    if req.enable_hr:
        raise refuse("enable_hr", "hires fix is not available here; send false (or img2img the result)")
    params, choice = _params(pipe, req)
    return Plan("txt2img", params, runner("txt2img", Inputs()), choice, {})


def _binary_mask(mask: Image.Image, rounded: bool) -> Image.Image:
    """A1111's reading of a mask: the alpha channel of a mask with transparency (cut at half when rounded),
    else its grey level."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.getchannel("A")
        return alpha.point(lambda v: 255 if v > 128 else 0) if rounded else alpha
    return mask.convert("L")


def _blur_axis(a: np.ndarray, sigma: int, axis: int) -> np.ndarray:
    """A1111's mask blur along one axis: a Gaussian of ``2·int(2.5σ + 0.5) + 1`` taps, mirrored at the edges
    without repeating the edge pixel, rounded back to 8 bits."""
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2.0 * sigma**2))
    taps /= taps.sum()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, mode="reflect")
    n = a.shape[axis]
    out = sum(w * np.take(padded, range(i, i + n), axis=axis) for i, w in enumerate(taps))
    return np.clip(np.rint(out), 0, 255)


@dataclass(frozen=True)
class MaskSettings:
    rounded: bool
    invert: bool
    blur_x: int
    blur_y: int


def mask_settings(req: Img2ImgRequest) -> MaskSettings:
    """``mask_blur`` sets both axes, as A1111's property does; each must be in 0..MAX_MASK_BLUR."""
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x or 0
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y or 0
    for field, value in (("mask_blur_x", blur_x), ("mask_blur_y", blur_y)):
        if not 0 <= value <= MAX_MASK_BLUR:
            raise refuse("mask_blur" if req.mask_blur is not None else field, f"must be in 0..{MAX_MASK_BLUR}")
    return MaskSettings(bool(req.mask_round), bool(req.inpainting_mask_invert), blur_x, blur_y)


def prepare_mask(mask: Image.Image, how: MaskSettings) -> Image.Image:
    """The mask as A1111 hands it to inpainting: binary read, inverted if asked, blurred."""
    m = _binary_mask(mask, how.rounded)
    if how.invert:
        m = ImageOps.invert(m)
    a = np.asarray(m, dtype=np.float64)
    if how.blur_x > 0:
        a = _blur_axis(a, how.blur_x, axis=1)
    if how.blur_y > 0:
        a = _blur_axis(a, how.blur_y, axis=0)
    return Image.fromarray(a.astype(np.uint8), mode="L")


def _img2img_neutral(req: Img2ImgRequest) -> None:
    if req.resize_mode:
        raise refuse("resize_mode", "only 0 (just resize) is available here")
    if req.initial_noise_multiplier not in (None, 1):
        raise refuse("initial_noise_multiplier", "only 1 is available here")
    if req.latent_mask:
        raise refuse("latent_mask", "a separate latent mask is not available here")
    if not req.init_images:
        raise refuse("init_images", "required: a list with one base64 image")
    if len(req.init_images) > 1:
        raise refuse("init_images", f"one image only here, got {len(req.init_images)}")
    if req.mask is None:
        return  # A1111 reads the inpainting fields only with a mask
    if req.inpaint_full_res:
        raise refuse("inpaint_full_res", "only the whole picture is inpainted here; send false")
    if req.inpainting_fill != 1:
        raise refuse("inpainting_fill", "only 1 (original) is available here")
    if req.mask_round is False:
        raise refuse("mask_round", "the mask is always binarised here; send true")
    if req.inpainting_mask_invert not in (None, 0, 1):
        raise refuse("inpainting_mask_invert", "must be 0 or 1")


def plan_img2img(pipe: Pipeline, req: Img2ImgRequest) -> Plan:
    _img2img_neutral(req)
    params, choice = _params(pipe, req)
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    if not 0 <= strength <= 1:
        raise refuse("denoising_strength", f"must be in [0, 1], got {strength}")
    limit = pipe.limits.max_pixels
    image = image_field(req.init_images[0], "init_images.0", limit)  # type: ignore[index]
    extra: dict[str, Any] = {"Denoising strength": strength}
    if req.mask is None:
        return Plan("img2img", params, runner("img2img", Inputs(image=image, strength=strength)), choice, extra)
    how = mask_settings(req)
    mask = image_field(req.mask, "mask", limit)
    if how.blur_x or how.blur_y:
        extra["Mask blur"] = how.blur_x if how.blur_x == how.blur_y else None
    if how.invert:
        extra["Mask mode"] = "Inpaint not masked"
    return Plan("inpaint", params, _inpainting(image, mask, how, strength), choice, extra)


def _inpainting(image: Image.Image, mask: Image.Image, how: MaskSettings, strength: float) -> Runner:
    def run(pipe: Pipeline, p: GenerationParams) -> Iterator[Event]:
        # Run as the worker iterates (a generator), so a failure here fails the job, and a wide blur of a
        # large mask never holds the event loop.
        im, m = image, prepare_mask(mask, how)
        if m.size != im.size:  # A1111 resizes each to width x height on its own; the size is checked by now
            size = (p.width or im.width, p.height or im.height)
            im, m = resized(to_rgb(im), *size), resized(m, *size)
        yield from inpaint(pipe, p, im, m, strength=strength)

    return run


def resolved_subseed(subseed: int | None) -> int:
    """A1111 draws a subseed for -1 even when variation seeds are off; it changes nothing but is reported."""
    return random.randrange(MAX_SEED) if subseed in (None, -1) else int(subseed)
