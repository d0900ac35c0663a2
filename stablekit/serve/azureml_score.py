"""Azure ML scoring entry script: ``init()`` loads the model once, ``run(raw_data)`` answers the online-endpoint
request of the SD model cards exactly as ``POST /score`` of ``stablekit serve`` does (same parsing, same images).

Under Microsoft's inference server::

    azmlinfsrv --entry_script "$(python -c 'import stablekit.serve.azureml_score as m; print(m.__file__)')"

The model is read from ``AZUREML_MODEL_DIR`` (where Azure mounts a registered model): that path itself when it is
a checkpoint file or a diffusers folder, else the one checkpoint or diffusers folder inside it
(``STABLEKIT_MODEL`` names one relative to it when there are several). Without ``AZUREML_MODEL_DIR`` the
built-in demo model is served. No web framework is needed: only pydantic, which the server brings.

``STABLEKIT_ENGINE=openvino`` (with ``STABLEKIT_PRECISION`` and ``STABLEKIT_CACHE_DIR``) runs the OpenVINO engine;
its conversion happens in ``init()``, once per cache folder: point ``STABLEKIT_CACHE_DIR`` at storage that outlives
the container, or run ``stablekit compile`` into it when building the image. ``STABLEKIT_SAFETY_CHECKER`` (a
``safety_checker`` folder or file, relative to the model directory or absolute) runs the safety checker on every
image, and ``nsfw_content_detected`` comes from it; ``STABLEKIT_SAFETY_ACTION=flag`` keeps flagged images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stablekit.demo import model_path as demo_model_path
from stablekit.engines import settings_from_environment
from stablekit.pipelines import Generated, Pipeline, txt2img
from stablekit.pipelines.params import resolve
from stablekit.serve import azure
from stablekit.serve.wire import ApiError, loads, png_base64
from stablekit.weights.safety import safety_from_environment

_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_pipe: Pipeline | None = None


def find_model(root: Path) -> Path:
    """The checkpoint file or diffusers folder in an Azure model directory."""
    chosen = os.environ.get("STABLEKIT_MODEL")
    if chosen:
        return root / chosen
    if root.is_file() or (root / "model_index.json").exists():
        return root
    found = sorted(p.parent for p in root.rglob("model_index.json"))
    if not found:
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        what = ", ".join(str(p.relative_to(root)) for p in found[:5]) or "nothing"
        raise ValueError(f"AZUREML_MODEL_DIR {root} holds {what}: set STABLEKIT_MODEL to the model's relative path")
    return found[0]


def init() -> None:
    global _pipe
    root = os.environ.get("AZUREML_MODEL_DIR")
    model = find_model(Path(root)) if root else demo_model_path()
    _pipe = Pipeline.from_file(model, **settings_from_environment())
    checker, action = safety_from_environment(root)
    if checker is not None:
        _pipe.safety_checker, _pipe.safety_action = checker, action


def score(raw_data: str) -> list[dict[str, Any]]:
    """The answer to one request body, or :class:`ApiError` (400 naming the field, 500 for a failed run)."""
    if _pipe is None:
        raise ApiError(503, "the model is not loaded (init() has not run)")
    params, prompts = azure.parse(loads(raw_data))
    try:
        resolve(_pipe.config, params, limits=_pipe.limits)  # every refusal before any compute
        generated = [ev for ev in txt2img(_pipe, params) if isinstance(ev, Generated)]
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    except RuntimeError as e:
        raise ApiError(500, f"generation failed: {e}") from e
    images = [png_base64(im, text) for ev in generated for im, text in zip(ev.images, ev.parameters, strict=True)]
    flags = [None if ev.nsfw is None else ev.nsfw[i] for ev in generated for i in range(len(ev.images))]
    return azure.answer(prompts, images, flags)


def run(raw_data: str) -> Any:
    try:
        return score(raw_data)
    except ApiError as e:
        # The server's response type carries a status; it exists only under the server.
        from azureml.contrib.services.aml_response import AMLResponse  # type: ignore[import-not-found]

        return AMLResponse({"error": e.message, "status": e.status}, e.status, json_str=True)
