"""Folders diffusers itself writes, from its own fast-test fixtures, loaded by us and compared image for image.

Each pipeline is ``get_dummy_components`` of diffusers' ``tests/pipelines/stable_diffusion/test_stable_diffusion
{,_img2img,_inpaint}.py`` and ``tests/pipelines/stable_diffusion_2/test_stable_diffusion{,_depth,_upscale}.py``
typed in by hand, unchanged, each network built after ``torch.manual_seed(0)`` as the fixtures build them: the
CLIP text encoder with ``intermediate_size=37`` (16 for the txt2img fixture), ``vocab_size=1000`` and its own
tokenizer. The fixtures load ``hf-internal-testing/tiny-random-clip``, which cannot be downloaded here, so
:func:`~tests.oracles.tiny_clip_tokenizer` writes a byte-level BPE vocabulary of exactly 1000 entries (its ids
unlike CLIP's: the specials first, padding with its own ``<|pad|>``, or ``!`` for the SD2 fixtures) and
transformers' ``CLIPTokenizer`` is built from those files.
diffusers' ``save_pretrained`` writes the folder; our loader and diffusers' ``from_pretrained`` both read it.

Nothing here comes from our own config writers: a test of our assumptions against themselves proves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.cli import main
from stablekit.cli.info import describe
from stablekit.images import read_parameters
from stablekit.pipelines import GenerationParams, Pipeline, depth2img, img2img, inpaint, txt2img, upscale
from stablekit.text.tokenizer import TokenizerError
from stablekit.weights import load_model, probe
from tests.oracles import require, tiny_clip_tokenizer
from tests.test_tasks_parity import (
    DEPTH,
    GUIDANCE,
    IMAGE,
    LOW_RES,
    MASK,
    NEGATIVE,
    PROMPT,
    SEED,
    STEPS,
    Run,
    _depth_estimator,
    _latent_diff,
    _ours,
    _params,
    _pixel_diff,
    _theirs,
    _unet,
    _vae,
)

diffusers = require("diffusers")
transformers = require("transformers")

VOCAB_SIZE = 1000


# --- diffusers' get_dummy_components, typed in ----------------------------------------------------------------


def _clip(sd2: bool = False, **sizes: Any) -> Any:
    torch.manual_seed(0)
    config = {
        "bos_token_id": 0,
        "eos_token_id": 2,
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "pad_token_id": 1,
        "vocab_size": 1000,
        **sizes,
    }
    if sd2:  # "SD2-specific config below"
        config |= {"hidden_act": "gelu", "projection_dim": 512}
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))


def _sd_ddim() -> Any:
    return diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )


def _no_safety() -> dict[str, Any]:
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _txt2img(tok: Callable[[str], Any]) -> Any:
    """test_stable_diffusion.py (SD1): 4/8 channels in two groups, an 8-wide text tower of 2 layers."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        time_cond_proj_dim=None,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    scheduler = _sd_ddim()
    vae = _vae([4, 8], norm_num_groups=2)
    text = _clip(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2)
    return diffusers.StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok("<|pad|>"), **_no_safety()
    )


def _sd2_txt2img(tok: Callable[[str], Any]) -> Any:
    """stable_diffusion_2/test_stable_diffusion.py: per-level head counts, linear projections, a GELU tower."""
    unet = _unet(4, attention_head_dim=(2, 4), use_linear_projection=True)
    scheduler = _sd_ddim()
    vae = _vae([32, 64], sample_size=128)
    return diffusers.StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=_clip(sd2=True), tokenizer=tok("!"), **_no_safety()
    )


def _img2img(tok: Callable[[str], Any]) -> Any:
    unet, scheduler = _unet(4), diffusers.PNDMScheduler(skip_prk_steps=True)
    vae, text = _vae([32, 64]), _clip()
    return diffusers.StableDiffusionImg2ImgPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok("<|pad|>"), **_no_safety()
    )


def _inpaint(tok: Callable[[str], Any]) -> Any:
    unet, scheduler = _unet(9), diffusers.PNDMScheduler(skip_prk_steps=True)
    vae, text = _vae([32, 64]), _clip()
    return diffusers.StableDiffusionInpaintPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok("<|pad|>"), **_no_safety()
    )


def _depth(tok: Callable[[str], Any]) -> Any:
    unet = _unet(5, attention_head_dim=(2, 4), use_linear_projection=True)
    scheduler = diffusers.PNDMScheduler(skip_prk_steps=True)
    vae, text = _vae([32, 64]), _clip()
    return diffusers.StableDiffusionDepth2ImgPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text,
        tokenizer=tok("<|pad|>"),
        depth_estimator=_depth_estimator(),
        feature_extractor=transformers.DPTImageProcessor(size={"height": 32, "width": 32}),
    )


def _upscale(tok: Callable[[str], Any]) -> Any:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )
    return diffusers.StableDiffusionUpscalePipeline(
        unet=unet,
        low_res_scheduler=diffusers.DDPMScheduler(),
        scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
        vae=_vae([32, 32, 64]),
        text_encoder=_clip(sd2=True),
        tokenizer=tok("!"),
        max_noise_level=350,
    )


BUILDERS = {
    "txt2img": _txt2img,
    "sd2": _sd2_txt2img,
    "img2img": _img2img,
    "inpaint": _inpaint,
    "depth": _depth,
    "upscale": _upscale,
}


@dataclass
class Pair:
    ours: Pipeline
    ref: Any
    folder: Path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="module")
def pairs(root: Path) -> Callable[[str], Pair]:
    """``pairs(kind)``: diffusers' fixture pipeline saved with ``save_pretrained``, and our pipeline of that folder."""
    built: dict[str, Pair] = {}
    tokenizers: dict[str, Any] = {}

    def tok(pad: str) -> Any:
        if pad not in tokenizers:
            tokenizers[pad] = tiny_clip_tokenizer(root / f"tokenizer-src-{len(tokenizers)}", pad=pad)
        return tokenizers[pad]

    def get(kind: str) -> Pair:
        if kind not in built:
            folder = root / kind
            made = BUILDERS[kind](tok)
            made.save_pretrained(folder)
            # Reloaded: from the file every scheduler value holds (see test_tasks_parity.py).
            ref = type(made).from_pretrained(folder, local_files_only=True)
            if not hasattr(ref.text_encoder, "text_model"):
                # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm, a level transformers 5 no
                # longer has; point it at the same LayerNorm (a plain attribute, not a second registered module).
                ref.text_encoder.text_model = SimpleNamespace(final_layer_norm=ref.text_encoder.final_layer_norm)
            ref.set_progress_bar_config(disable=True)
            built[kind] = Pair(Pipeline.from_file(folder, device="cpu", dtype=torch.float32), ref, folder)
        return built[kind]

    return get


def _report(kind: str, got: Run, want: Run) -> int:
    lat, px = _latent_diff(got.latents, want.latents), _pixel_diff(got.images, want.images)
    print(f"{kind}: latents {lat:.2e} (relative), pixels {px}/255")
    assert lat <= 1e-4 and px <= 2, (lat, px)
    return px


def _call(kind: str, pair: Pair, params: GenerationParams) -> tuple[Run, dict[str, Any]]:
    if kind in ("txt2img", "sd2"):
        return _ours(txt2img(pair.ours, params)), {}
    if kind == "img2img":
        return _ours(img2img(pair.ours, params, IMAGE, strength=0.6)), {"image": IMAGE, "strength": 0.6}
    if kind == "inpaint":
        call = {"image": IMAGE, "mask_image": MASK, "strength": 1.0, "height": 32, "width": 32}
        return _ours(inpaint(pair.ours, params, IMAGE, MASK, strength=1.0)), call
    if kind == "depth":
        call = {"image": IMAGE, "depth_map": DEPTH, "strength": 0.8}
        return _ours(depth2img(pair.ours, params, IMAGE, depth_map=DEPTH, strength=0.8)), call
    return _ours(upscale(pair.ours, params, LOW_RES, noise_level=20)), {"image": LOW_RES, "noise_level": 20}


# --- the tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sampler"),
    [
        ("txt2img", "ddim"),
        ("txt2img", "euler_a"),
        ("sd2", "ddim"),
        ("img2img", "ddim"),
        ("inpaint", "ddim"),
        ("depth", "dpmpp_2m"),
        ("upscale", "ddim"),
    ],
)
def test_fixture_folder_matches_diffusers(pairs: Callable[[str], Pair], kind: str, sampler: str) -> None:
    pair = pairs(kind)
    text = pair.ours.config.text
    assert text.vocab_size == 1000 and pair.ours.tokenizer.source.endswith("tokenizer.json")
    got, call = _call(kind, pair, _params(sampler))
    _report(f"{kind}/{sampler}", got, _theirs(pair.ref, sampler, [SEED, SEED + 1], **call))


def test_the_folder_says_every_text_size(pairs: Callable[[str], Pair]) -> None:
    text = pairs("img2img").ours.config.text
    assert (text.width, text.mlp_width, text.heads, text.layers, text.layer_norm_eps) == (32, 37, 4, 5, 1e-5)
    assert (text.vocab_size, text.pad_token, text.kind) == (1000, 1, "openai")
    sd2 = pairs("sd2").ours
    assert (sd2.config.text.kind, sd2.config.text.layers_used, sd2.config.text.pad_token) == ("openclip", 5, 3)
    assert sd2.tokenizer.pad_token == "!" and sd2.config.unet.head_dim == 16  # heads (2, 4) at widths 32, 64


def test_prompts_use_the_folders_tokenizer(pairs: Callable[[str], Pair]) -> None:
    pair = pairs("txt2img")
    prompt = "A painting of a squirrel eating a burger"
    want = pair.ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    got = pair.ours.tokenizer.tokenize(prompt, pad_token=pair.ours.config.text.pad_token).ids[0].tolist()
    assert got == want and got[0] == 0 and 2 in got and got[-1] == 1  # bos 0, eos 2, padded with <|pad|> (1)


def _embeds(ref: Any, text: str, n: int, clip_skip: int) -> torch.Tensor:
    return ref.encode_prompt([text] * n, "cpu", 1, False, clip_skip=clip_skip)[0]


@pytest.mark.parametrize(("kind", "skip"), [("txt2img", 2), ("sd2", 2), ("sd2", 4)])
def test_clip_skip_matches_diffusers(pairs: Callable[[str], Pair], kind: str, skip: int) -> None:
    """Our clip skip N (A1111's numbering) is diffusers' ``clip_skip=N - 1``, for both towers. It applies to the
    negative prompt too, as in A1111; diffusers' pipelines encode the negative prompt without it, so the reference
    gets both prompts through diffusers' own ``encode_prompt(clip_skip=N - 1)``."""
    pair = pairs(kind)
    skipping = Pipeline.from_file(pair.folder, device="cpu", dtype=torch.float32, clip_skip=skip)
    context, _ = skipping.encode_prompts([PROMPT])
    assert (context - _embeds(pair.ref, PROMPT, 1, skip - 1)).abs().max() <= 1e-5
    got = _ours(txt2img(skipping, _params("ddim")))
    latents: list[torch.Tensor] = []

    def keep(pipe: Any, i: int, t: torch.Tensor, kwargs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        latents.append(kwargs["latents"].clone())
        return {}

    original = pair.ref.scheduler
    pair.ref.scheduler = diffusers.DDIMScheduler.from_config(original.config, clip_sample=False)
    try:
        images = pair.ref(
            prompt_embeds=_embeds(pair.ref, PROMPT, 2, skip - 1),
            negative_prompt_embeds=_embeds(pair.ref, NEGATIVE, 2, skip - 1),
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(s) for s in (SEED, SEED + 1)],
            callback_on_step_end=keep,
            output_type="pil",
        ).images
    finally:
        pair.ref.scheduler = original
    _report(f"{kind}/clip skip {skip}", got, Run(latents, images))
    plain = _ours(txt2img(pair.ours, _params("ddim")))
    assert _pixel_diff(got.images, plain.images) > 2  # it changes the image
    layers = pair.ours.config.text.layers_used
    with pytest.raises(ValueError, match=f"clip skip must be an integer in 1..{layers}"):
        Pipeline(pair.ours.model, pair.ours.config, device="cpu", tokenizer=pair.ours.tokenizer, clip_skip=layers + 1)


def test_clip_skip_command(pairs: Callable[[str], Pair], tmp_path: Path) -> None:
    # Guidance 1: no negative prompt, so diffusers' own clip_skip= call is the whole reference.
    pair = pairs("txt2img")
    out = tmp_path / "out.png"
    args = ["generate", "A painting of a squirrel", "--model", str(pair.folder), "--steps", "3", "--seed", "7"]
    assert main([*args, "--sampler", "ddim", "--guidance", "1", "--clip-skip", "2", "-o", str(out)]) == 0
    want = pair.ref(
        "A painting of a squirrel",
        num_inference_steps=3,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(7),
        clip_skip=1,
        output_type="pil",
    ).images
    assert _pixel_diff([Image.open(out).convert("RGB")], want) <= 2
    assert "Clip skip: 2" in (read_parameters(out) or "")


def test_single_file_conversion_keeps_the_tokenizer(pairs: Callable[[str], Pair], tmp_path: Path) -> None:
    """The folder's vocabulary is not CLIP's: ``convert`` stores it in the single file's metadata, and the file
    gives the folder's image; converted back to a folder, diffusers reads the same tokenizer from it."""
    pair = pairs("img2img")
    single = tmp_path / "model.safetensors"
    assert main(["convert", str(pair.folder), str(single)]) == 0
    loaded = load_model(single)
    assert loaded.tokenizer is not None and len(loaded.tokenizer.vocab) == VOCAB_SIZE
    assert loaded.config.text == pair.ours.config.text
    ours = Pipeline.from_file(single, device="cpu", dtype=torch.float32)
    params = _params("ddim")
    got = _ours(img2img(ours, params, IMAGE, strength=0.6))
    folder_run = _ours(img2img(pair.ours, params, IMAGE, strength=0.6))
    assert _pixel_diff(got.images, folder_run.images) == 0
    _report(
        "img2img from the converted file", got, _theirs(pair.ref, "ddim", [SEED, SEED + 1], image=IMAGE, strength=0.6)
    )

    back = tmp_path / "back"
    assert main(["convert", str(single), str(back), "--to", "diffusers"]) == 0
    assert (back / "tokenizer" / "vocab.json").is_file()
    reread = transformers.CLIPTokenizer.from_pretrained(back / "tokenizer")
    prompt = "A painting of a squirrel eating a burger"
    assert reread.pad_token_id == pair.ref.tokenizer.pad_token_id == 1
    padded = {"padding": "max_length", "max_length": 77}
    assert reread(prompt, **padded).input_ids == pair.ref.tokenizer(prompt, **padded).input_ids
    assert Pipeline.from_file(back, device="cpu").tokenizer.source.endswith("vocab.json")


def test_info_states_what_it_read_and_assumed(pairs: Callable[[str], Pair], capsys: pytest.CaptureFixture[str]) -> None:
    pair = pairs("img2img")
    lines = describe(probe(pair.folder))
    report = "\n".join(lines)
    assert "sd1 (non-standard sizes)" in report
    assert "eps (scheduler/scheduler_config.json prediction_type)" in report
    text = next(line for line in lines if line.startswith("text:"))
    for part in ("width 32", "MLP 37", "5 layers", "4 heads", "vocabulary 1000", "LayerNorm eps 1e-05", "pad id 1"):
        assert part in text, text
    tokenizer = next(line for line in lines if line.startswith("tokenizer:"))
    assert "tokenizer/tokenizer.json" in tokenizer and "1000 tokens" in tokenizer
    assert main(["info", str(pair.folder)]) == 0
    assert "MLP 37" in capsys.readouterr().out


def test_a_folder_without_its_tokenizer_says_so_and_refuses_prompts(
    pairs: Callable[[str], Pair], tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(pairs("txt2img").folder, folder)
    shutil.rmtree(folder / "tokenizer")
    notes = probe(folder).notes
    assert any("no tokenizer/ folder" in n and "assumed" in n for n in notes), notes
    assert any("embeds only 1000 tokens" in n for n in notes), notes
    with pytest.raises(ValueError, match=r"ids up to 49407, but the text encoder embeds only 1000 tokens"):
        Pipeline.from_file(folder, device="cpu")
    # The weights still convert: only prompting needs the tokenizer.
    assert main(["convert", str(folder), str(tmp_path / "m.safetensors")]) == 0


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tokenizer: (tokenizer / name).write_text(text)


EMPTY_BPE = json.dumps({"model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": {}}})
DAMAGE = {  # what is done to the folder's tokenizer/ -> the error it gives
    "empty tokenizer.json": (_write("tokenizer.json", ""), r"tokenizer\.json: not a readable JSON file"),
    "no vocabulary": (_write("tokenizer.json", EMPTY_BPE), r"tokenizer\.json: the vocabulary .* empty"),
    "empty vocab.json": (_write("vocab.json", "{}"), r"vocab\.json: the vocabulary is empty"),
    "no merges.txt": (_write("vocab.json", '{"a": 0}'), r"merges\.txt: missing"),
    "no files": (lambda t: (t / "tokenizer.json").unlink(), r"tokenizer: neither vocab\.json \+ merges\.txt nor"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_broken_tokenizer_folder_is_one_line_naming_the_file(
    pairs: Callable[[str], Pair], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(pairs("txt2img").folder, folder)
    spoil, message = DAMAGE[damage]
    spoil(folder / "tokenizer")
    with pytest.raises(TokenizerError, match=message):
        load_model(folder)
    assert main(["info", str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(folder) in err, err


def test_out_of_range_ids_are_an_error_before_the_model_runs(pairs: Callable[[str], Pair]) -> None:
    encoder = pairs("txt2img").ours.model.text_encoder
    ids = torch.zeros(1, 77, dtype=torch.long)
    ids[0, 5] = VOCAB_SIZE
    with pytest.raises(ValueError, match="token id 1000 is outside the text encoder's 1000-token vocabulary"):
        encoder(ids)


def test_fixture_images_are_not_flat(pairs: Callable[[str], Pair]) -> None:
    # The comparisons above can fail: the fixtures' images vary, and two seeds give two images.
    run = _ours(txt2img(pairs("txt2img").ours, _params("ddim")))
    assert np.asarray(run.images[0]).std() > 1 and _pixel_diff(run.images[:1], run.images[1:]) > 2
