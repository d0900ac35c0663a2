"""The Azure ML entry script under Microsoft's own inference server (``azmlinfsrv``, the
``azureml-inference-server-http`` package that `make test` installs into ``.venv-azureml``): the model card's
request answered exactly as ``POST /score`` of ``stablekit serve`` answers it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

import stablekit.serve.azureml_score as entry
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Pipeline
from stablekit.serve import ServeSettings, Service, create_app
from stablekit.serve.wire import ApiError
from stablekit.weights import save_model
from tests.serving import _free_port, running
from tests.tiny import TINY_SD1

SERVER = Path(__file__).resolve().parents[1] / ".venv-azureml" / "bin" / "azmlinfsrv"
REQUEST = {
    "input_data": {
        "columns": ["prompt"],
        "data": ["a photograph of an astronaut riding a horse", "lion holding hunted deer in grass fields"],
        "index": [0, 1],
        "parameters": {"num_inference_steps": 3, "guidance_scale": 7.5, "seed": 9, "width": 64, "height": 64},
    }
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("azureml-model")
    (root / "model").mkdir()  # Azure mounts a registered model one folder down
    save_model(LatentDiffusion(TINY_SD1), TINY_SD1, root / "model" / "tiny.safetensors")
    return root


def test_find_model_in_an_azure_model_dir(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert entry.find_model(model_dir) == model_dir / "model" / "tiny.safetensors"
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="STABLEKIT_MODEL"):
        entry.find_model(tmp_path)
    monkeypatch.setenv("STABLEKIT_MODEL", "b.ckpt")
    assert entry.find_model(tmp_path) == tmp_path / "b.ckpt"


@pytest.mark.usefixtures("one_thread")  # azmlinfsrv runs with OMP_NUM_THREADS=1 below
def test_entry_script_under_azmlinfsrv_answers_as_serve_does(model_dir: Path) -> None:
    if not SERVER.exists():
        pytest.skip(f"{SERVER} is missing: `make install-azureml` installs Azure's inference server")
    port = _free_port()
    env = {**os.environ, "AZUREML_MODEL_DIR": str(model_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(SERVER), "--entry_script", entry.__file__, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"azmlinfsrv did not start:\n{proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.5)
        azure = httpx.post(f"{url}/score", json=REQUEST, timeout=120)
        bad = httpx.post(f"{url}/score", json={"input_data": {"data": []}}, timeout=30)
        nan = httpx.post(
            f"{url}/score",
            content=b'{"input_data": {"data": ["x"], "parameters": {"guidance_scale": NaN}}}',
            headers={"content-type": "application/json"},
            timeout=30,
        )
    finally:
        proc.terminate()
        proc.wait(30)
    assert azure.status_code == 200, azure.text
    assert bad.status_code == 400, (bad.status_code, bad.text[:500])
    assert "input_data.data" in bad.json()["error"], bad.text
    assert nan.status_code == 400 and "NaN" in nan.json()["error"], nan.text
    pipe = Pipeline.from_file(model_dir / "model" / "tiny.safetensors", device="cpu")
    with running(create_app(Service(pipe, ServeSettings()))) as served:
        ours = httpx.post(f"{served}/score", json=REQUEST, timeout=120)
    assert ours.status_code == 200
    assert azure.json() == ours.json()  # the same prompts and, byte for byte, the same PNGs


def test_entry_script_refusals_in_process(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # score() is run() without the server's response type: every refusal is an ApiError with its status.
    monkeypatch.setattr(entry, "_pipe", None)
    with pytest.raises(ApiError, match="not loaded") as err:
        entry.score("{}")
    assert err.value.status == 503
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(model_dir))
    entry.init()
    for body, message in (
        ("{", "not valid JSON"),
        ('{"input_data": {"data": ["x"], "parameters": {"width": 7}}}', "width"),
    ):
        with pytest.raises(ApiError, match=message) as err:
            entry.score(body)
        assert err.value.status == 400
