"""``stablekit serve``: the model behind HTTP, with the Azure ML schema (``/score``), the AUTOMATIC1111 API
(``/sdapi/v1/...``) and stablekit's own job API (``/v1/...``), one worker and a bounded queue.

FastAPI and uvicorn are the ``[serve]`` extra. The names below load on first use, so the Azure ML entry script
(:mod:`stablekit.serve.azureml_score`) imports this package without them.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "stablekit.serve.app",
    "ServeSettings": "stablekit.serve.service",
    "Service": "stablekit.serve.service",
    "WorkerSettings": "stablekit.serve.worker",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stablekit.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
