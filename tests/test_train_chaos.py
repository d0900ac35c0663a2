"""Chaos: ``stablekit train`` SIGKILLed mid-checkpoint-write, between checkpoints and during the export, resumed
each time, ends bit-for-bit where an uninterrupted run does, leaving no temporary file behind. The same code as
``benchmarks/chaos_train.py`` (which does 20 kills at seeded random moments and prints the figures)."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")


def _script() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos_train.py"
    spec = importlib.util.spec_from_file_location("chaos_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_three_kills_and_resumes_end_bit_exact(tmp_path: Path) -> None:
    chaos = _script()
    kills = [chaos.Kill("write", 2, 0.3), chaos.Kill("between", 4, 0.5), chaos.Kill("end", 6, 0.5)]
    fig = chaos.run(tmp_path, len(kills), seed=0, steps=6, plan_=kills)
    assert fig.kills == 3, fig.lines()
    assert fig.mid_write >= 1, fig.lines()  # the first kill lands while the temporary checkpoint is written
    assert fig.compared > 500 and fig.max_abs_diff == 0.0, fig.lines()
    assert fig.mismatched == [] and fig.leftovers == [], fig.lines()
    assert fig.ok
