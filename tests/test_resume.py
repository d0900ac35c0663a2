"""Resume: N steps straight equal K steps, a fresh trainer resuming, then N - K steps (bit-exact on CPU); a
checkpoint write that never finished is never picked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stablekit.train.checkpoint import atomic_save, checkpoint_path, list_checkpoints, newest_checkpoint
from stablekit.train.trainer import Trainer
from tests.test_trainer import make_stage, quick, toy_data

# 10 examples at 4 per step: the resume point (epoch 0, index 8) sits just before an epoch boundary.
N, K = 5, 2


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    opt = trainer.optimizer.state_dict()["state"]
    return {
        **{f"w.{k}": v for k, v in trainer.module.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.shadow.items()},
        **{f"adam.{i}.{k}": v for i, s in opt.items() for k, v in s.items()},
    }


@pytest.mark.parametrize("kind", ["unet", "clip"])
def test_resume_continues_exactly(tmp_path: Path, kind: str) -> None:
    data = toy_data(10)
    straight = Trainer(make_stage(kind), data, quick(steps=N, checkpoint_every=100, log_every=1), tmp_path / "straight")
    straight.fit()

    Trainer(make_stage(kind), data, quick(steps=K, checkpoint_every=100, log_every=1), tmp_path / "split").fit()
    # A fresh stage whose trained weights are scrambled: they must all come from the checkpoint. (The UNet
    # stage's frozen networks are inputs, loaded from the earlier stages' files in a real run.)
    stage = make_stage(kind)
    with torch.no_grad():
        for p in stage.module.parameters():
            p.add_(torch.randn_like(p))
    resumed = Trainer(stage, data, quick(steps=N, checkpoint_every=100, log_every=1), tmp_path / "split")
    torch.manual_seed(123)  # global random states are restored from the checkpoint too
    resumed.fit(resume=True)
    assert resumed.resumed_from == K and resumed.step == N
    assert (resumed.epoch, resumed.index) == (straight.epoch, straight.index) == (2, 4)

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert torch.equal(torch.get_rng_state(), _rng_after(tmp_path / "straight"))
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("straight", "split")
    ]
    assert len(losses[0]) == N and losses[0] == losses[1]


def _rng_after(folder: Path, which: str = "torch") -> Any:
    found = newest_checkpoint(folder / "checkpoints")
    assert found is not None
    return found[1]["rng"][which]


def test_an_interrupted_write_is_never_picked(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    good = {"complete": True, "step": 4}
    atomic_save(good, checkpoint_path(folder, 4))
    # A writer killed mid-way leaves its temporary file; a torn copy under a final name is also ignored.
    (folder / ".ckpt-00000006.pt.tmp-4242").write_bytes(b"PK\x03\x04 half a zip")
    atomic_save({"complete": True, "step": 8}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    checkpoint_path(folder, 8).write_bytes(whole[: len(whole) // 2])
    assert [s for s, _ in list_checkpoints(folder)] == [8, 4]
    found = newest_checkpoint(folder)
    assert found is not None and found[0] == checkpoint_path(folder, 4) and found[1] == good


def test_a_failed_save_leaves_the_previous_file(tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, 1)
    atomic_save({"complete": True, "step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_save({"complete": True, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_resume_with_no_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = Trainer(make_stage("vae"), toy_data(8), quick(steps=1), tmp_path)
    assert trainer.resume() is False and trainer.step == 0


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path: Path) -> None:
    Trainer(make_stage("vae"), toy_data(8), quick(steps=1), tmp_path).fit()
    with pytest.raises(ValueError, match="earlier run"):
        Trainer(make_stage("vae"), toy_data(8), quick(steps=1), tmp_path).fit()


def test_a_finished_run_resumed_reports_its_final_loss_and_total_time(tmp_path: Path) -> None:
    cfg = quick(steps=2, log_every=1)
    first = Trainer(make_stage("vae"), toy_data(8), quick(steps=1, log_every=1), tmp_path)
    first.fit()
    done = Trainer(make_stage("vae"), toy_data(8), cfg, tmp_path)
    done_summary = done.fit(resume=True)
    again = Trainer(make_stage("vae"), toy_data(8), cfg, tmp_path).fit(resume=True)  # nothing left to do
    assert again.resumed_from == again.steps == 2
    assert again.final_loss == done_summary.final_loss
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The logged clock carries over a resume: the second run's time includes the first run's.
    assert rows[0]["time"] <= done.seconds_before < rows[0]["time"] + 5  # saved just after the log line
    assert rows[1]["time"] > rows[0]["time"]


def test_resume_is_exact_over_skipped_samples(tmp_path: Path) -> None:
    """Samples skipped when the source opens (a caption that is not UTF-8, a file that is not an image) and one
    skipped when it is decoded (a truncated PNG, replaced by the next record) are the same in every epoch and
    in a resumed process, so resume stays bit-exact."""
    import io

    from PIL import Image

    from stablekit.train.data import collate, open_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(12):
        buf = io.BytesIO()
        Image.effect_noise((40, 40), 40 + i).convert("RGB").save(buf, format="PNG")
        png = buf.getvalue()
        (folder / f"{i:02d}.png").write_bytes(png[: len(png) // 2] if i == 3 else png if i != 7 else b"not a png")
        (folder / f"{i:02d}.txt").write_bytes(b"caf\xe9" if i == 5 else f"picture {i}".encode())

    def run(steps: int, out: str, resume: bool = False) -> Trainer:
        data = open_dataset(folder, size=32)
        assert len(data) == 10  # 05 (caption) and 07 (image) skipped; 03 only fails when decoded
        cfg = quick(steps=steps, checkpoint_every=100)
        trainer = Trainer(make_stage("vae"), data, cfg, tmp_path / out, collate=collate)
        trainer.fit(resume=resume)
        assert data.report()["unreadable_at_load"] == 1
        return trainer

    straight = run(N, "straight")
    run(K, "split")
    resumed = run(N, "split", resume=True)
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_leftover_temporary_files_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    """A process killed mid-write leaves its checkpoint's temporary file (as large as a checkpoint) or an export's
    ``.partial``: resume never reads them, but over many restarts they would fill the disk. Those of a process
    still running are not touched."""
    import os
    import subprocess
    import sys

    Trainer(make_stage("vae"), toy_data(8), quick(steps=1), tmp_path).fit()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "checkpoints"
        stale = [folder / f".ckpt-00000002.pt.tmp-{int(dead.stdout)}", folder / f".ckpt-00000004.pt.tmp-{os.getpid()}"]
        stale.append(tmp_path / ".vae.safetensors.k2j4_x.partial")
        live = folder / f".ckpt-00000002.pt.tmp-{alive.pid}"
        for p in [*stale, live]:
            p.write_bytes(b"PK\x03\x04 half a checkpoint")
        Trainer(make_stage("vae"), toy_data(8), quick(steps=2), tmp_path).fit(resume=True)
        assert [p.name for p in stale if p.exists()] == []
        assert live.exists()
    finally:
        alive.kill()
        alive.wait()


def test_a_fresh_run_seeds_the_global_random_states(tmp_path: Path) -> None:
    """Python's and numpy's global states start from os.urandom in every process. A fresh run seeds them, so two
    runs of one config save (and a resumed run restores) the same states, and anything drawing from them repeats."""
    import random

    import numpy as np

    saved: list[Any] = []
    for name in ("a", "b"):
        random.seed(name)  # two processes start differently
        np.random.seed(len(saved) + 7)
        Trainer(make_stage("vae"), toy_data(8), quick(steps=1), tmp_path / name).fit()
        saved.append(_rng_after(tmp_path / name, "python"))
        saved.append(_rng_after(tmp_path / name, "numpy")["keys"])
    assert saved[0] == saved[2] and torch.equal(saved[1], saved[3])


def test_a_torn_log_line_does_not_stop_a_resume(tmp_path: Path) -> None:
    """A crash mid-append (power loss, a full disk) can leave half a line at the end of log.jsonl; the resumed
    run drops it with the other lines past its checkpoint rather than failing to parse it."""
    Trainer(make_stage("vae"), toy_data(8), quick(steps=1, log_every=1), tmp_path).fit()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    Trainer(make_stage("vae"), toy_data(8), quick(steps=2, log_every=1), tmp_path).fit(resume=True)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
