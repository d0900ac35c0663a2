"""The AUTOMATIC1111 API (``/sdapi/v1``) driven over real HTTP by an unchanged A1111 client, ``webuiapi``: the
images are the pipeline's for the same settings, seeds come back as A1111 reports them, values that cannot be
honoured are a 400 naming the field, progress and interrupt behave as A1111's clients expect, and the API key
works as HTTP Basic."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter1d

from stablekit.pipelines import GenerationParams, Pipeline, collect, img2img, inpaint, txt2img
from stablekit.serve import ServeSettings, Service, create_app
from stablekit.serve.a1111 import parse_infotext
from tests.serving import running

PROMPT = "a red circle on a blue background"
SIZE: dict[str, Any] = {"width": 64, "height": 64, "cfg_scale": 7.5}


@pytest.fixture(scope="module")
def pipe(tiny_model_file: Path) -> Pipeline:
    return Pipeline.from_file(tiny_model_file, device="cpu")


@pytest.fixture(scope="module")
def server(pipe: Pipeline) -> Iterator[tuple[webuiapi.WebUIApi, str]]:
    with running(create_app(Service(pipe, ServeSettings()))) as url:
        yield _client(url), url


def _client(url: str, **kw: Any) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), sampler="Euler a", steps=4, **kw)


def _params(seed: int, **kw: Any) -> GenerationParams:
    """What the A1111 calls below ask for, as the Python API takes it."""
    settings: dict[str, Any] = {"steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "sampler": "euler_a"}
    return GenerationParams(kw.pop("prompt", PROMPT), seed=seed, **{**settings, **kw})


def _same(got: list[Image.Image], want: list[Image.Image]) -> bool:
    return len(got) == len(want) and all(
        np.array_equal(np.asarray(g.convert("RGB")), np.asarray(w.convert("RGB")))
        for g, w in zip(got, want, strict=True)
    )


def _refused(call: Callable[[], object]) -> str:
    """The error text of a call webuiapi reports as failed (it raises RuntimeError(status, body))."""
    with pytest.raises(RuntimeError) as e:
        call()
    status, body = e.value.args
    assert status == 400, body
    return str(json.loads(body)["error"])


def _noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _a1111_blur(mask: Image.Image, sigma: int) -> Image.Image:
    """A1111's mask blur, computed independently: a Gaussian cut at int(2.5σ + 0.5) taps, mirrored edges, each
    axis rounded to 8 bits (x first), as its processing code applies OpenCV's GaussianBlur."""
    a = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        a = np.clip(np.rint(gaussian_filter1d(a, sigma, axis=axis, mode="mirror", truncate=2.5)), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def test_txt2img_is_the_pipelines_image_with_a1111s_info(server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline) -> None:
    api, _ = server
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", seed=5, batch_size=2, **SIZE)
    want = collect(txt2img(pipe, _params(5, negative_prompt="blurry", batch_size=2)))
    assert _same(r.images, want)
    info = r.info
    assert isinstance(r.json["info"], str)  # A1111 sends info as a JSON string
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6] and len(info["all_subseeds"]) == 2
    assert info["all_prompts"] == [PROMPT, PROMPT] and info["all_negative_prompts"] == ["blurry", "blurry"]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"], info["batch_size"]) == (64, 64, 4, 7.5, 2)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == pipe.name
    assert info["infotexts"] == [im.info["parameters"] for im in r.images]
    assert "Seed: 5," in info["infotexts"][0] and "Seed: 6," in info["infotexts"][1]
    assert r.parameters["prompt"] == PROMPT and r.parameters["enable_hr"] is False and r.parameters["seed"] == 5


def test_a_random_seed_is_reported_and_n_iter_counts_batches(
    server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline
) -> None:
    api, _ = server
    r = api.txt2img(prompt=PROMPT, seed=-1, n_iter=2, **SIZE)
    seed = r.info["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32 and r.info["all_seeds"] == [seed, seed + 1]
    assert _same(r.images, collect(txt2img(pipe, _params(seed, batch_count=2))))


@pytest.mark.parametrize(
    ("fields", "ours", "options"),
    [
        ({"sampler_name": "DPM++ 2M", "scheduler": "automatic"}, "dpmpp_2m_karras", {}),  # A1111 1.9's default
        ({"sampler_name": "DPM++ 2M Karras"}, "dpmpp_2m_karras", {}),  # the joined name, split as A1111 splits it
        ({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"}, "dpmpp_2m", {}),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "euler", {"karras": True}),
        ({"sampler_name": "Euler", "eta": 0.3}, "euler", {}),  # A1111 never gives Euler an eta
        ({"sampler_name": "DDIM", "eta": 0.5}, "ddim", {"eta": 0.5}),
    ],
)
def test_sampler_and_schedule_names_run_what_a1111_means(
    server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline, fields: dict[str, Any], ours: str, options: dict[str, Any]
) -> None:
    api, _ = server
    r = api.txt2img(prompt=PROMPT, seed=9, steps=3, **SIZE, **fields)
    assert _same(r.images, collect(txt2img(pipe, _params(9, steps=3, sampler=ours, sampler_options=options))))
    if options.get("karras"):
        assert "Sampler: Euler, Schedule type: Karras," in r.images[0].info["parameters"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, "alwayson_scripts.ControlNet"),
        ({"save_images": True}, "save_images"),
        ({"cfg_scale": 0.5}, "cfg_scale"),
        ({"sampler_name": "DPM++ SDE", "s_noise": 0.9}, "s_noise"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}, "scheduler"),
        ({"sampler_name": "DPM++ 2M SDE"}, "scheduler"),  # Automatic means exponential for it
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
        ({"sampler_name": "Euler", "s_churn": 0.5}, "s_churn"),
        ({"sampler_name": "DPM++ 2M SDE Karras", "s_noise": 0.9}, "s_noise"),
        ({"prompt": "a [cat:dog:0.5]"}, "prompt"),  # prompt editing
        ({"prompt": "a [cat|dog]"}, "prompt"),  # alternation
        ({"prompt": "a cat <lora:style:0.8>"}, "prompt"),
        ({"prompt": "a cat AND a dog"}, "prompt"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"width": 65}, "width"),
        ({"n_iter": 0}, "n_iter"),
    ],
)
def test_values_that_cannot_be_honoured_are_400_naming_the_field(
    server: tuple[webuiapi.WebUIApi, str], fields: dict[str, Any], field: str
) -> None:
    api, _ = server
    settings = {"prompt": PROMPT, "seed": 1, **SIZE, **fields}
    assert _refused(lambda: api.txt2img(**settings)).startswith(f"{field}: ")


def test_unknown_fields_are_400_and_escaped_brackets_are_text(
    server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline
) -> None:
    api, url = server
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "enable_hrx": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("enable_hrx: ")
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("steps: ")
    got = api.txt2img(prompt=r"a cat \(tabby\)", seed=2, steps=2, **SIZE)
    literal = Pipeline(pipe.model, pipe.config, tokenizer=pipe.tokenizer, prompt_weighting=False)
    assert _same(got.images, collect(txt2img(literal, _params(2, prompt="a cat (tabby)", steps=2))))


def test_emphasis_break_and_long_prompts_are_read_as_a1111_reads_them(
    server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline
) -> None:
    api, _ = server
    prompt = "a (cat:1.2) on [a mat] BREAK " + "tabby, " * 40  # three 75-token chunks
    assert pipe.prompt_chunks([prompt]) == 3
    got = api.txt2img(prompt=prompt, seed=3, steps=2, **SIZE)
    ours = collect(txt2img(pipe, _params(3, prompt=prompt, steps=2)))
    assert _same(got.images, ours)
    literal = Pipeline(pipe.model, pipe.config, tokenizer=pipe.tokenizer, prompt_weighting=False)
    assert not _same(ours, collect(txt2img(literal, _params(3, prompt=prompt, steps=2))))


def test_img2img_and_inpainting_are_the_pipelines(server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline) -> None:
    api, url = server
    init = _noise_image(0)
    r = api.img2img(images=[init], prompt=PROMPT, seed=7, denoising_strength=0.6, **SIZE)
    assert _same(r.images, collect(img2img(pipe, _params(7), init, strength=0.6)))
    assert r.info["denoising_strength"] == 0.6 and r.parameters["init_images"] is None
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 12, 47, 40), fill=255)
    whole = {"prompt": PROMPT, "inpaint_full_res": False, "inpainting_fill": 1}
    r = api.img2img(images=[init], mask_image=mask, mask_blur=0, seed=8, denoising_strength=0.8, **whole, **SIZE)
    assert _same(r.images, collect(inpaint(pipe, _params(8), init, mask, strength=0.8)))
    # A1111's default blur of 4, on the inverted mask: the region it would repaint.
    r = api.img2img(images=[init], mask_image=mask, inpainting_mask_invert=1, seed=8, **whole, **SIZE)
    blurred = _a1111_blur(Image.fromarray(255 - np.asarray(mask)), 4)
    assert _same(r.images, collect(inpaint(pipe, _params(8), init, blurred, strength=0.75)))
    assert r.info["extra_generation_params"]["Mask blur"] == 4
    # A mask of another size than the image: A1111 resizes each to width x height.
    small = mask.resize((32, 32), Image.Resampling.NEAREST)
    r = api.img2img(images=[init], mask_image=small, mask_blur=0, seed=8, **whole, **SIZE)
    stretched = small.resize((64, 64), Image.Resampling.LANCZOS)
    assert _same(r.images, collect(inpaint(pipe, _params(8), init, stretched, strength=0.75)))
    # webuiapi's own defaults ask for "only masked" and "fill": not available, and said so.
    assert _refused(lambda: api.img2img(images=[init], mask_image=mask, **SIZE)).startswith("inpaint_full_res: ")
    fill = _refused(lambda: api.img2img(images=[init], mask_image=mask, inpaint_full_res=False, **SIZE))
    assert fill.startswith("inpainting_fill: ")
    assert _refused(lambda: api.img2img(images=[init], resize_mode=1, **SIZE)).startswith("resize_mode: ")
    body = {"init_images": ["http://169.254.169.254/latest/meta-data"], "prompt": "x"}
    r2 = httpx.post(f"{url}/sdapi/v1/img2img", json=body, timeout=30)
    assert r2.status_code == 400 and "URLs are not fetched" in r2.json()["error"]


def test_progress_and_interrupt_answer_with_what_is_done(server: tuple[webuiapi.WebUIApi, str]) -> None:
    api, url = server
    assert api.get_progress()["state"]["job_count"] == 0 and api.interrupt() == {}
    result: dict[str, Any] = {}
    worker = _client(url)  # its own HTTP session: requests' sessions are not shared across threads
    thread = threading.Thread(
        target=lambda: result.update(r=worker.txt2img(prompt=PROMPT, seed=3, steps=25, n_iter=2, **SIZE))
    )
    thread.start()
    deadline = time.monotonic() + 60
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"]:
            seen.append(p)
        if p["state"]["job_no"] == 1:  # the second batch has started: the first image is done
            break
        time.sleep(0.05)
    assert seen, "the job never showed in the progress"
    first = seen[0]
    assert first["state"]["job_count"] == 2 and first["state"]["sampling_steps"] == 25
    assert 0 < first["progress"] <= 1 and first["eta_relative"] >= 0 and first["current_image"] is None
    assert api.interrupt() == {}
    thread.join(60)
    r = result["r"]
    assert len(r.images) == 1 and r.info["all_seeds"] == [3, 4] and len(r.info["infotexts"]) == 1
    assert "Seed: 3," in r.images[0].info["parameters"] and r.info["interrupted"] is True
    assert api.get_progress()["progress"] == 0


def test_samplers_models_options_and_scripts(server: tuple[webuiapi.WebUIApi, str], pipe: Pipeline) -> None:
    api, url = server
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "PLMS", "UniPC"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"} and "k_euler_a" in samplers["Euler a"]["aliases"]
    assert api.util_get_scheduler_names() == ["automatic", "karras", "uniform"]
    assert api.util_get_model_names() == [pipe.name] and api.util_get_current_model() == pipe.name
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    options = api.get_options()
    assert options["CLIP_stop_at_last_layers"] == pipe.clip_skip and options["eta_noise_seed_delta"] == 0
    same = {"sd_model_checkpoint": pipe.name, "CLIP_stop_at_last_layers": pipe.clip_skip, "samples_save": False}
    assert api.set_options(same) is None
    api.util_set_model(pipe.name)
    assert api.set_options({"sd_model_checkpoint": f"{pipe.name}.safetensors [0123abcd]"}) is None  # A1111's title
    for key, value in (("sd_model_checkpoint", "other.safetensors"), ("eta_noise_seed_delta", 31337)):
        r = httpx.post(f"{url}/sdapi/v1/options", json={key: value}, timeout=30)
        assert r.status_code == 400 and r.json()["error"].startswith(f"{key}: "), r.text


def test_png_info_parses_the_parameters_text(server: tuple[webuiapi.WebUIApi, str]) -> None:
    api, url = server
    made = api.txt2img(prompt=PROMPT, negative_prompt="dull", seed=4, steps=2, **SIZE)
    r = api.png_info(made.image)
    assert r.info == made.image.info["parameters"] and r.json["items"]["parameters"] == r.info
    p = r.parameters
    assert (p["Prompt"], p["Negative prompt"], p["Seed"], p["Steps"]) == (PROMPT, "dull", "4", "2")
    assert (p["Size-1"], p["Size-2"], p["Sampler"]) == ("64", "64", "Euler a")
    bad = httpx.post(f"{url}/sdapi/v1/png-info", json={"image": "https://example.com/a.png"}, timeout=30)
    assert bad.status_code == 400 and "URLs are not fetched" in bad.json()["error"]


def test_infotext_parsing_handles_quotes_and_multiline_prompts() -> None:
    text = 'a cat,\non a mat\nNegative prompt: dogs\nSteps: 20, Sampler: Euler a, Model: "v1, pruned", Size: 512x768'
    assert parse_infotext(text) == {
        "Prompt": "a cat,\non a mat",
        "Negative prompt": "dogs",
        "Steps": "20",
        "Sampler": "Euler a",
        "Model": "v1, pruned",
        "Size-1": "512",
        "Size-2": "768",
    }
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_the_api_key_works_as_basic_auth(pipe: Pipeline) -> None:
    with running(create_app(Service(pipe, ServeSettings(api_key="k3y")))) as url:
        assert httpx.get(f"{url}/sdapi/v1/sd-models", timeout=10).status_code == 401
        wrong = httpx.get(f"{url}/sdapi/v1/sd-models", auth=("webui", "nope"), timeout=10)
        assert wrong.status_code == 401
        anonymous = _client(url)
        assert anonymous.get_sd_models() == {"error": "a valid API key is required", "status": 401}
        api = _client(url, username="webui", password="k3y")
        assert api.get_sd_models()[0]["title"] == pipe.name
        assert len(api.txt2img(prompt=PROMPT, seed=1, steps=2, **SIZE).images) == 1
