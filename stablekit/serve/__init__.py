"""``stablekit serve``: the model behind HTTP, with the Azure ML schema (``/score``), the AUTOMATIC1111 API
(``/sdapi/v1/...``) and stablekit's own job API (``/v1/...``), one worker and a bounded queue.

FastAPI and uvicorn are the ``[serve]`` extra; nothing here is imported by the rest of the package.
"""

from stablekit.serve.app import create_app
from stablekit.serve.service import ServeSettings, Service
from stablekit.serve.worker import WorkerSettings

__all__ = ["ServeSettings", "Service", "WorkerSettings", "create_app"]
