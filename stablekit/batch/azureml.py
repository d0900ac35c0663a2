"""Azure ML batch-deployment scoring script: ``init()`` loads the model once, ``run(mini_batch)`` generates one
image per row of each input CSV file, with the code of ``stablekit batch``.

Point the deployment's ``code_configuration.scoring_script`` at this file (``python -c 'import
stablekit.batch.azureml as m; print(m.__file__)'``). The model is read from ``AZUREML_MODEL_DIR`` as the online
scoring script reads it (``STABLEKIT_MODEL`` picks one of several); without it, the built-in demo model. Each
input file ``NAME.csv`` gets the folder ``NAME/`` under the job's output path (``AZUREML_BI_OUTPUT_PATH``):
its PNGs, ``predictions.csv`` and ``manifest.jsonl``, exactly as ``stablekit batch NAME.csv --out NAME``
writes them. A retried mini-batch resumes: finished rows are not computed again.

``STABLEKIT_BATCH_SIZE`` (rows per UNet batch, default 4) and ``STABLEKIT_SEED`` (the base seed, default 0)
are this script's options; ``STABLEKIT_ENGINE``, ``STABLEKIT_PRECISION`` and ``STABLEKIT_CACHE_DIR`` pick the engine
as for the online script, and ``STABLEKIT_SAFETY_CHECKER`` / ``STABLEKIT_SAFETY_ACTION`` the safety checker (its
verdict fills the ``nsfw_content_detected`` column). ``error_threshold`` is Azure's own business here: a row
that fails is reported in its file's manifest, and a file that cannot be read at all is reported in its result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stablekit.batch.job import JobOptions, prepare_output, run_job
from stablekit.batch.rows import InputError, read_file
from stablekit.demo import model_path as demo_model_path
from stablekit.engines import settings_from_environment
from stablekit.pipelines import Pipeline
from stablekit.weights.safety import safety_from_environment

_pipe: Pipeline | None = None


def init() -> None:
    global _pipe
    root = os.environ.get("AZUREML_MODEL_DIR")
    if root:
        # Lazily: the online script's module brings pydantic, which only a named model directory needs here.
        from stablekit.serve.azureml_score import find_model

        _pipe = Pipeline.from_file(find_model(Path(root)), **settings_from_environment())
    else:
        _pipe = Pipeline.from_file(demo_model_path(), **settings_from_environment())
    checker, action = safety_from_environment(root)
    if checker is not None:
        _pipe.safety_checker, _pipe.safety_action = checker, action


def _options() -> JobOptions:
    return JobOptions(
        batch_size=int(os.environ.get("STABLEKIT_BATCH_SIZE", "4")),
        seed=int(os.environ.get("STABLEKIT_SEED", "0")),
        progress=False,
    )


def score_file(pipe: Pipeline, path: Path, output: Path) -> dict[str, Any]:
    """One input file's job; its result names the file, its images and its failures."""
    out = output / path.stem
    try:
        rows = read_file(path)
        prepare_output(out)
        summary = run_job(pipe, rows, out, _options())
    except (InputError, OSError) as e:
        return {"input_csv_name": path.name, "error": str(e), "images": 0, "failed": 0}
    return {"input_csv_name": path.name, "error": None, "images": summary.done, "failed": summary.failed}


def run(mini_batch: list[str]) -> list[str]:
    """One result per input file (Azure's ``append_row`` writes each as a line of its output file)."""
    if _pipe is None:
        raise RuntimeError("the model is not loaded (init() has not run)")
    output = Path(os.environ.get("AZUREML_BI_OUTPUT_PATH", "."))
    return [json.dumps(score_file(_pipe, Path(p), output), ensure_ascii=False) for p in mini_batch]
