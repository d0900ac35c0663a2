"""The web page at ``/``, driven in a real browser: Playwright's Python API over Debian's headless Chromium
(``/usr/bin/chromium``; Playwright's own browser download cannot run here), against ``stablekit serve`` on
loopback. The page is typed into and clicked as a person would; what it shows is checked against the server.

A missing browser or Playwright is a failure, not a skip: ``make install-browser`` (as root) installs Chromium,
``make install-test`` Playwright; CI runs both.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from stablekit.pipelines import GenerationParams, NonFiniteError, Pipeline, Progress, collect, txt2img
from stablekit.pipelines.events import Event
from stablekit.serve import ServeSettings, Service, create_app, native
from stablekit.serve.page import CSP
from tests.serving import running

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach Google, which this network refuses.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL = (
    "the web page's browser tests need Debian's Chromium and Playwright's Python package: "
    "`apt-get install -y chromium` as root (`make install-browser`) and `pip install playwright==1.65.2` "
    "(`make install-test`); not `playwright install`, whose browser download cannot run here"
)
TIMEOUT_MS = 60_000
STATIC = Path(__file__).resolve().parents[1] / "stablekit" / "serve" / "static"


@pytest.fixture(scope="module")
def pipe(tiny_model_file: Path) -> Pipeline:
    return Pipeline.from_file(tiny_model_file, device="cpu")


@pytest.fixture(scope="module")
def server(pipe: Pipeline) -> Iterator[tuple[str, Service]]:
    service = Service(pipe, ServeSettings())
    with running(create_app(service)) as url:
        yield url, service


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright is not installed: {INSTALL}", pytrace=False)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL}", pytrace=False)
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: tuple[str, Service]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    console: list[str] = []
    tab.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    tab.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    tab.console = console  # what the page logged, for assertions (a CSP violation is logged here)
    yield tab
    context.close()


def _expect(locator: Any) -> Any:
    """Playwright's waiting assertions (imported here: the browser fixture says how to install Playwright)."""
    from playwright.sync_api import expect

    return expect(locator)


def _open(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def _fill(page: Any, **fields: object) -> None:
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _download(page: Any, card: Any) -> Image.Image:
    with page.expect_download() as info:
        card.locator("a.download").click()
    return _png(Path(info.value.path()).read_bytes())


# --- served as a page should be (no browser) -----------------------------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data.strip()


def test_the_page_and_its_files_carry_types_nosniff_and_csp_without_a_key(pipe: Pipeline) -> None:
    service = Service(pipe, ServeSettings(api_key="s3cret"))
    with running(create_app(service)) as url:
        for path, kind in [
            ("/", "text/html"),
            ("/static/app.js", "text/javascript"),
            ("/static/style.css", "text/css"),
            ("/static/samplers.json", "application/json"),
        ]:
            r = httpx.get(f"{url}{path}", timeout=10)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["content-type"].startswith(kind), path
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["content-security-policy"] == CSP
        assert "default-src 'self'; img-src 'self' data: blob:" in CSP and "unsafe" not in CSP
        names = [s["name"] for s in httpx.get(f"{url}/static/samplers.json", timeout=10).json()]
        assert "euler_a" in names and "dpmpp_2m" in names
        for path in ["/static/nope.js", "/static/..%2Fpage.py", "/static/index.html/x"]:
            r = httpx.get(f"{url}{path}", timeout=10)
            assert r.status_code == 404 and "error" in r.json(), path
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        assert httpx.post(f"{url}/v1/jobs", json={"prompt": "x"}, timeout=10).status_code == 401


def test_the_page_has_no_inline_script_or_style_and_never_writes_html() -> None:
    parser = _Tags()
    parser.feed((STATIC / "index.html").read_text())
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert scripts and all(a.get("src", "").startswith("/static/") for a in scripts) and not parser.script_text
    for tag, attrs in parser.tags:
        assert "style" not in attrs and not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("src", "href"):
            assert not (attrs.get(name) or "/").startswith(("http:", "https:", "//")), (tag, attrs)
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "EventSource" not in script.replace("rather than EventSource", "")  # it cannot send the key


# --- in the browser ------------------------------------------------------------------------------------------


def test_generate_shows_progress_and_a_result_that_downloads_at_its_size(
    page: Any, server: tuple[str, Service], pipe: Pipeline
) -> None:
    url, _ = server
    _open(page, url)
    assert page.text_content("#model") == f"model: {pipe.name}"
    page.fill("#prompt", "a red circle on a blue background")
    _fill(page, steps=3, guidance=7.5, seed=7, width=64, height=48)
    page.select_option("#sampler", "euler")
    page.click("#generate")
    card = page.locator(".card").first
    card.wait_for()
    _expect(page.locator("#status")).to_have_text("Done.")
    assert page.eval_on_selector("#progress", "p => [p.value, p.max]") == [3, 3]
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")  # a preview was shown
    assert page.is_hidden("#error") and page.locator(".card").count() == 1
    assert card.locator("dd[data-field=seed]").text_content() == "7"
    assert card.locator("dd[data-field=size]").text_content() == "64×48"
    assert "Seed: 7" in card.locator(".parameters").text_content()

    image = _download(page, card)
    assert image.size == (64, 48) and image.format == "PNG"
    params = GenerationParams(
        "a red circle on a blue background", steps=3, guidance_scale=7.5, seed=7, width=64, height=48, sampler="euler"
    )
    want = collect(txt2img(pipe, params))[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))

    page.fill("#seed", "")
    card.locator("button.reuse").click()
    assert page.input_value("#seed") == "7"
    card.locator("button.use-input").click()  # the result becomes image-to-image's input
    assert page.get_attribute("[data-task=img2img]", "aria-selected") == "true"
    assert page.get_attribute("#image-thumb", "src").startswith("data:image/png;base64,")
    assert page.is_visible("#image-thumb") and page.is_visible("#strength")
    assert not [line for line in page.console if "error" in line.lower()], page.console


def test_a_job_that_finished_before_its_stream_opened_still_shows_its_images(
    page: Any, server: tuple[str, Service]
) -> None:
    url, service = server
    _open(page, url)

    def late(route: Any) -> None:  # hold the event stream until the job is done
        _wait_until(lambda: any(j.done and j.params.prompt == "late" for j in service.worker.jobs.values()))
        route.continue_()

    page.route("**/v1/jobs/*/events", late)
    page.fill("#prompt", "late")
    _fill(page, steps=2, seed=9, batch=2, width=64, height=64)
    page.click("#generate")
    _expect(page.locator("#status")).to_have_text("Done.")
    cards = page.locator(".card")
    assert cards.count() == 2 and page.is_hidden("#error")
    assert [cards.nth(i).locator("dd[data-field=seed]").text_content() for i in range(2)] == ["9", "10"]


def _wait_until(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def _held(gate: threading.Event) -> Any:
    """``runner`` for the job API whose txt2img holds at its first step (repeating it) until cancelled."""

    def runner(task: str, inputs: Any) -> Any:
        def run(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
            for ev in txt2img(pipe, params):
                yield ev
                while isinstance(ev, Progress) and not gate.wait(0.1):
                    yield ev

        return run

    return runner


def test_cancel_stops_the_running_job(page: Any, server: tuple[str, Service], monkeypatch: Any) -> None:
    url, service = server
    gate = threading.Event()
    monkeypatch.setattr(native, "runner", _held(gate))
    try:
        _open(page, url)
        page.fill("#prompt", "held")
        _fill(page, steps=3, width=64, height=64)
        page.select_option("#sampler", "euler")  # one model call per step (PNDM adds a warm-up step)
        page.click("#generate")
        _expect(page.locator("#status")).to_have_text("Step 1 of 3.")
        running_jobs = [j for j in service.worker.running if j.params.prompt == "held"]
        assert len(running_jobs) == 1 and running_jobs[0].state == "running"
        assert page.is_enabled("#cancel") and page.is_disabled("#generate")
        page.click("#cancel")
        _expect(page.locator("#status")).to_have_text(re.compile("^Cancelled"))
        assert page.text_content("#status") == "Cancelled at step 1 of 3."
        assert running_jobs[0].state == "cancelled"
        assert page.locator(".card").count() == 0 and page.is_hidden("#error")
        assert page.is_enabled("#generate") and page.is_disabled("#cancel")
    finally:
        gate.set()


def test_server_errors_are_shown_as_text(page: Any, server: tuple[str, Service], monkeypatch: Any) -> None:
    url, _ = server
    _open(page, url)
    page.fill("#prompt", "x")
    _fill(page, steps=3, width=65, height=64)
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error").startswith("400: width must be a positive multiple of 8")
    assert page.text_content("#status") == "Failed." and page.is_enabled("#generate")

    # Server text that looks like HTML stays text.
    hostile = "<img src=x id=injected>"
    page.eval_on_selector("#sampler", "(s, v) => s.add(new Option('hostile', v))", hostile)
    page.select_option("#sampler", hostile)
    _fill(page, width=64)
    page.click("#generate")
    _expect(page.locator("#error")).to_contain_text("unknown sampler")
    assert hostile in page.text_content("#error") and page.locator("#injected").count() == 0

    # A job that fails while running: the stream's "done" carries the error.
    def broken(task: str, inputs: Any) -> Any:
        def run(_pipe: Pipeline, _params: GenerationParams) -> Iterator[Event]:
            raise NonFiniteError("the model produced NaN at step 1")
            yield

        return run

    monkeypatch.setattr(native, "runner", broken)
    page.select_option("#sampler", "")
    page.click("#generate")
    _expect(page.locator("#error")).to_contain_text("NaN")
    assert page.text_content("#error") == "the job failed: the model produced NaN at step 1"


def test_the_api_key_is_asked_for_sent_and_kept_for_the_tab(page: Any, pipe: Pipeline) -> None:
    service = Service(pipe, ServeSettings(api_key="s3cret"))
    with running(create_app(service)) as url:
        _open(page, url)
        page.fill("#prompt", "keyed")
        _fill(page, steps=2, width=64, height=64, seed=3)
        page.click("#generate")
        page.wait_for_selector("#error:not([hidden])")
        assert page.text_content("#error") == "401: a valid API key is required"
        page.fill("#api-key", "s3cret")
        page.click("#generate")
        page.locator(".card").first.wait_for()
        assert page.is_hidden("#error")
        assert page.evaluate("sessionStorage.getItem('stablekit.apiKey')") == "s3cret"
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.input_value("#api-key") == "s3cret"


def _sent(request: Any) -> dict[str, Any]:
    body = request.post_data_json
    assert isinstance(body, dict)
    return body


def _data_url_image(value: str) -> Image.Image:
    head, _, data = value.partition(",")
    assert head == "data:image/png;base64", head
    return _png(base64.b64decode(data))


def test_img2img_and_inpaint_take_an_uploaded_image_and_a_painted_mask(
    page: Any, server: tuple[str, Service], tmp_path: Path
) -> None:
    url, _ = server
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source)
    _open(page, url)
    page.click("[data-task=img2img]")
    page.set_input_files("#image-file", str(source))
    page.wait_for_selector("#image-thumb:not([hidden])")
    page.fill("#prompt", "a blue square")
    _fill(page, steps=3, strength=0.5, seed=5)
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = _sent(sent.value)
    assert body["task"] == "img2img" and body["strength"] == 0.5 and "width" not in body
    assert np.asarray(_data_url_image(body["image"]).convert("RGB")).tolist() == np.asarray(Image.open(source)).tolist()
    card = page.locator(".card").first
    card.wait_for()
    assert card.locator("dd[data-field=task]").text_content() == "img2img"
    assert _download(page, card).size == (64, 64)

    page.click("[data-task=inpaint]")
    assert page.is_visible("#mask-canvas") and page.is_hidden("#image-thumb")
    page.click("#generate")  # nothing painted yet: said so, nothing sent
    page.wait_for_selector("#error:not([hidden])")
    assert "paint the region" in page.text_content("#error")
    box = page.locator("#mask-canvas").bounding_box()
    page.eval_on_selector("#brush", "b => { b.value = '8'; }")  # display pixels, scaled to the image's
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.25, steps=8)
    page.mouse.up()
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
        page.click("#generate")
    body = _sent(sent.value)
    mask = np.asarray(_data_url_image(body["mask"]).convert("L"))
    assert body["task"] == "inpaint" and mask.shape == (64, 64)
    assert mask[16, 32] == 255 and mask[48, 32] == 0 and mask[16, 1] == 0  # painted row white, the rest black
    _expect(page.locator(".card")).to_have_count(2)
    assert page.is_hidden("#error")
    assert page.locator(".card").first.locator("dd[data-field=task]").text_content() == "inpaint"


def test_upscale_sends_the_image_and_noise_level_and_shows_the_larger_result(page: Any, tmp_path: Path) -> None:
    from stablekit.demo import upscaler_path

    source = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (30, 60, 200)).save(source)
    service = Service(Pipeline.from_file(upscaler_path(), device="cpu"), ServeSettings())
    with running(create_app(service)) as url:
        _open(page, url)
        page.click("[data-task=upscale]")
        assert page.is_visible("#noise-level") and page.is_hidden("#width") and page.is_hidden("#strength")
        page.set_input_files("#image-file", str(source))
        page.wait_for_selector("#image-thumb:not([hidden])")
        page.fill("#prompt", "a blue square")
        _fill(page, steps=1, seed=2, **{"noise-level": 20})
        with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as sent:
            page.click("#generate")
        body = _sent(sent.value)
        assert body["task"] == "upscale" and body["noise_level"] == 20
        assert "width" not in body and "height" not in body and "strength" not in body
        card = page.locator(".card").first
        card.wait_for()
        assert page.is_hidden("#error") and card.locator("dd[data-field=size]").text_content() == "64×64"
        assert _download(page, card).size == (64, 64)
