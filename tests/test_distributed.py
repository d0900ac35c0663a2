"""Two CPU processes on gloo, launched by torchrun, train like one process at the same global batch.

The test runs this module under ``torchrun --nproc_per_node 2`` (the ``__main__`` part below) for the UNet
stage and for CLIP (whose contrastive loss gathers features across processes), then repeats the same runs in
one process and compares gradients and weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from stablekit.train.trainer import TrainConfig, Trainer
from tests.test_trainer import EXACT_ADAM, compare_runs, make_stage, quick, toy_data

KINDS = ("unet", "clip")
ROOT = Path(__file__).resolve().parent.parent


def config() -> TrainConfig:
    # 2 processes x 2 examples per micro-batch x 2 micro-batches per step.
    return quick(steps=3, batch_size=4, grad_accum=2, log_every=1, **EXACT_ADAM)


def run(kind: str, out: Path) -> Trainer:
    trainer = Trainer(make_stage(kind), toy_data(), config(), out / kind)
    trainer.fit()
    return trainer


def test_two_processes_match_one(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, "-m", "tests.test_distributed", str(tmp_path / "ddp")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in KINDS:
        single = run(kind, tmp_path / "single")
        other = run(kind, tmp_path / "reload")  # a carrier for the two-process result
        result = torch.load(tmp_path / "ddp" / kind / "result.pt", weights_only=True)
        other.module.load_state_dict(result["weights"])
        for name, p in other.module.named_parameters():
            p.grad = result["grads"][name]
        grad, weight = compare_runs(single, other)
        assert grad < 1e-5 and weight < 5e-6, (kind, grad, weight)
        # Only rank 0 logged: one line per step, with the single process's loss.
        ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / kind / "log.jsonl").read_text().splitlines()]
        one_log = [json.loads(x) for x in (tmp_path / "single" / kind / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in ddp_log] == [1, 2, 3]
        for a, b in zip(ddp_log, one_log, strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-6 * max(1.0, abs(b["loss"]))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for kind in KINDS:
        trainer = run(kind, out)
        assert trainer.world == 2
        if trainer.rank == 0:
            grads = {n: p.grad for n, p in trainer.module.named_parameters()}
            torch.save({"weights": trainer.module.state_dict(), "grads": grads}, out / kind / "result.pt")
