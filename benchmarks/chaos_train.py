"""Chaos test for training: ``stablekit train`` SIGKILLed at random moments and resumed each time ends with the
weights of an uninterrupted run, bit for bit.

    python benchmarks/chaos_train.py [--kills 20] [--seed 0] [--steps 40]

A tiny VAE run (the demo preset at 16 px, a checkpoint every 2 steps, so writes are frequent) runs once straight
through as the reference, then again as a fresh process that is SIGKILLed and restarted with ``--resume`` until
it completes. Kill moments are drawn from a seeded generator over the run's timeline, of four kinds: ``write``
(while a checkpoint's temporary file is being written), ``between`` (during training steps), ``start`` (during
start-up and the resume itself) and ``end`` (after the last checkpoint: plotting and export). A kill counts as
mid-write when the killed process's temporary checkpoint file is still there afterwards. Then every tensor of
the final checkpoint (weights, EMA, optimizer, random states) and of the exported model is compared with the
reference's, as are the logged losses, and the run folder must hold no leftover temporary file. Prints the
figures; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

KINDS = ("write", "between", "start", "end")
WEIGHTS = (0.4, 0.4, 0.1, 0.1)
EVERY = 2  # steps per checkpoint
POLL = 0.0005  # seconds between looks at the checkpoint folder
MAX_TRIES = 5  # restarts one kill may take when the process keeps finishing before its moment


@dataclass(frozen=True)
class Kill:
    kind: str  # one of KINDS
    ckpt: int  # write/between: the checkpoint step it aims at (moved past the resume point when behind it)
    frac: float  # where in the window after the event the kill lands, 0..1


@dataclass
class Timings:
    """The reference run's timeline, in seconds: what the kill moments are scaled by."""

    startup: float  # spawn to the first checkpoint write
    write: float  # a checkpoint write (temporary file present)
    between: float  # one checkpoint written to the next begun
    end: float  # last checkpoint written to exit
    total: float


@dataclass
class Figures:
    kills: int = 0
    mid_write: int = 0
    restarts: int = 0
    resumed_from_checkpoint: int = 0
    completed_before_kill: int = 0
    steps_redone: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0
    reference_wall: float = 0.0
    compared: int = 0
    max_abs_diff: float = 0.0
    mismatched: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)  # one line per kill

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.leftovers and self.max_abs_diff == 0.0

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {self.kinds[k]}" for k in KINDS)
        return [
            f"kills: {self.kills} ({kinds})",
            f"landed mid-write (temporary checkpoint present at kill time): {self.mid_write}",
            f"restarts with --resume: {self.restarts} ({self.resumed_from_checkpoint} found a checkpoint; "
            f"{self.completed_before_kill} finished before their kill moment)",
            f"steps redone: {self.steps_redone}",
            f"wall time: {self.wall:.1f} s with kills, {self.reference_wall:.1f} s uninterrupted",
            f"tensors compared: {self.compared}; max abs difference: {self.max_abs_diff:g}",
            f"mismatches: {len(self.mismatched)} {self.mismatched[:5] if self.mismatched else ''}".rstrip(),
            f"leftover temporary files: {len(self.leftovers)} {self.leftovers[:5] if self.leftovers else ''}".rstrip(),
            "RESULT: " + ("bit-exact" if self.ok else "MISMATCH"),
        ]


def make_data(folder: Path) -> Path:
    from stablekit.train.demo_data import write_demo_dataset

    return write_demo_dataset(folder, 8, size=16, seed=0)


def train_command(data: Path, out: Path, steps: int) -> list[str]:
    # --resume on an empty folder starts fresh, so the reference and every restart run the same command.
    return [
        *(sys.executable, "-m", "stablekit", "train", "vae", "--out", str(out), "--data", str(data)),
        *("--size", "16", "--steps", str(steps), "--batch-size", "2", "--warmup", "2", "--lr", "1e-3"),
        *("--checkpoint-every", str(EVERY), "--keep-checkpoints", "3", "--log-every", "1", "--seed", "0"),
        *("--no-progress", "--resume"),
    ]


def _env() -> dict[str, str]:
    # One thread: the reference and the restarts must reduce in the same order; and the package importable from
    # a source checkout run as a script.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path}


def _final(ckpts: Path, step: int) -> Path:
    return ckpts / f"ckpt-{step:08d}.pt"


def _tmp(ckpts: Path, step: int, pid: int) -> Path:
    return ckpts / f".ckpt-{step:08d}.pt.tmp-{pid}"  # atomic_save's temporary name


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())


def _check_exit(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"training exited with {proc.returncode}:\n" + "\n".join(tail))


def reference(data: Path, out: Path, steps: int) -> Timings:
    """The uninterrupted run, watched: when each checkpoint's temporary file appears and its final name does."""
    ckpts = out / "checkpoints"
    t0 = time.perf_counter()
    proc = _spawn(train_command(data, out, steps), out.with_suffix(".log"))
    begun: dict[int, float] = {}
    done: dict[int, float] = {}
    marks = list(range(EVERY, steps + 1, EVERY))
    while proc.poll() is None:
        now = time.perf_counter() - t0
        for c in marks:
            if c not in begun and _tmp(ckpts, c, proc.pid).exists():
                begun[c] = now
            if c not in done and _final(ckpts, c).exists():
                done[c] = now
        time.sleep(POLL)
    total = time.perf_counter() - t0
    _check_exit(proc, out.with_suffix(".log"))
    writes = [done[c] - begun[c] for c in marks if c in begun and c in done]
    gaps = [begun[c + EVERY] - done[c] for c in marks if c in done and c + EVERY in begun]
    return Timings(
        startup=min(begun.values(), default=total / 2),
        write=statistics.median(writes) if writes else 0.01,
        between=statistics.median(gaps) if gaps else 0.05,
        end=total - done.get(steps, total),
        total=total,
    )


def plan(kills: int, steps: int, rng: random.Random) -> list[Kill]:
    """``kills`` moments spread over the run in order: the run advances between kills and the ``end`` kills come
    last, once the last checkpoint is written. The kinds are allotted by WEIGHTS (the rest to ``write``), so every
    seed aims as many kills into checkpoint writes."""
    allotted = {kind: int(weight * kills) for kind, weight in zip(KINDS, WEIGHTS, strict=True)}
    allotted["write"] += kills - sum(allotted.values())
    kinds = [kind for kind, n in allotted.items() for _ in range(n)]
    rng.shuffle(kinds)
    drawn = []
    for kind in kinds:
        where = 1.0 if kind == "end" else rng.random()
        ckpt = min(steps, EVERY * (1 + int(where * (steps // EVERY))))
        drawn.append((where, Kill(kind, ckpt, rng.random())))
    return [k for _, k in sorted(drawn, key=lambda wk: wk[0])]


def resume_step(ckpts: Path) -> int:
    """The step the next run resumes from: the trainer's own choice of checkpoint."""
    from stablekit.train.checkpoint import newest_checkpoint

    found = newest_checkpoint(ckpts)
    return 0 if found is None else int(found[1]["step"])


def _logged_step(out: Path) -> int:
    path = out / "log.jsonl"
    steps = [0]
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass  # a torn last line: the trainer drops it on resume
    return max(steps)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def _wait(proc: subprocess.Popen[bytes], ready: Callable[[], bool], deadline: float = float("inf")) -> bool:
    """Poll until ``ready()`` (True) or the process exits or the deadline passes (False)."""
    while proc.poll() is None and time.perf_counter() < deadline:
        if ready():
            return True
        time.sleep(POLL)
    return False


def _kill_at(
    proc: subprocess.Popen[bytes], kill: Kill, resumed: int, steps: int, t: Timings, ckpts: Path
) -> str | None:
    """Wait for ``kill``'s moment and SIGKILL the process: the kind of moment it was (a kill aimed past the last
    checkpoint lands in the ``end``), or None when the process finished first."""
    spawned = time.perf_counter()
    kind, target = kill.kind, max(kill.ckpt, resumed + EVERY)
    if (kind == "write" and target > steps) or (kind == "between" and target >= steps):
        kind = "end"  # past the last checkpoint only plotting and the export are left
    if kind == "start":
        delay = kill.frac * t.startup
    elif kind == "write":
        if not _wait(proc, lambda: _tmp(ckpts, target, proc.pid).exists()):
            return None
        delay = kill.frac * 0.8 * t.write  # inside the write, allowing for the time the poll took to see it
    elif kind == "between":
        if not _wait(proc, lambda: _final(ckpts, target).exists()):
            return None
        delay = kill.frac * t.between
    elif resumed < steps:  # end: after the last checkpoint
        if not _wait(proc, lambda: _final(ckpts, steps).exists()):
            return None
        delay = kill.frac * t.end
    else:  # end, in a run resumed at the end: it starts up and exports again
        delay = kill.frac * (t.startup + t.end)
    start = time.perf_counter() if kind != "start" else spawned
    _wait(proc, lambda: False, start + delay)
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return kind


def chaos(data: Path, out: Path, steps: int, kills: list[Kill], t: Timings) -> Figures:
    """Run to completion, SIGKILLed at each of ``kills`` and restarted with --resume after each."""
    fig = Figures()
    ckpts = out / "checkpoints"
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    spawns = 0
    for n, kill in enumerate(kills, start=1):
        for _ in range(MAX_TRIES):
            resumed = resume_step(ckpts)
            fig.restarts += spawns > 0
            fig.resumed_from_checkpoint += resumed > 0
            spawns += 1
            before = _read(out / "log.jsonl")
            proc = _spawn(train_command(data, out, steps), log)
            kind = _kill_at(proc, kill, resumed, steps, t, ckpts)
            if kind is not None:
                break
            # It finished first (a window measured on the reference was too long for this run): the next
            # restart, which resumes at the end and exports again, is killed earlier in its life.
            _check_exit(proc, log)
            fig.completed_before_kill += 1
            kill = replace(kill, frac=kill.frac / 4)
        else:
            continue
        fig.kills += 1
        fig.kinds[kind] += 1
        mid_write = any(ckpts.glob(f".ckpt-*.pt.tmp-{proc.pid}"))
        fig.mid_write += mid_write
        # An unchanged log holds the previous run's lines: this one was killed before it trimmed them, so before
        # it trained a step.
        reached = _logged_step(out) if _read(out / "log.jsonl") != before else resumed
        now = resume_step(ckpts)
        fig.steps_redone += max(0, reached - now)
        fig.trace.append(
            f"kill {n:2d}: {kind:7s} aimed at checkpoint {kill.ckpt:3d}, frac {kill.frac:.2f}; resumed from "
            f"{resumed:3d}, reached step {reached:3d}, next resumes from {now:3d}{'; mid-write' if mid_write else ''}"
        )
    fig.restarts += spawns > 0
    fig.resumed_from_checkpoint += resume_step(ckpts) > 0
    proc = _spawn(train_command(data, out, steps), log)
    proc.wait()
    _check_exit(proc, log)
    fig.wall = time.perf_counter() - t0
    return fig


def _tensors(prefix: str, obj: Any) -> dict[str, Any]:
    """Every leaf of a checkpoint, by path; tensors stay tensors."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(f"{prefix}.{key}", value).items()}
    if isinstance(obj, list | tuple):
        return {k: v for i, value in enumerate(obj) for k, v in _tensors(f"{prefix}.{i}", value).items()}
    return {prefix: obj}


def compare(reference_out: Path, out: Path, steps: int, fig: Figures) -> None:
    """Every tensor of the final checkpoint and the export, the data position and the logged losses."""
    from safetensors.torch import load_file

    def leaves(folder: Path) -> dict[str, Any]:
        state = torch.load(_final(folder / "checkpoints", steps), map_location="cpu", weights_only=True)
        state.pop("seconds")  # wall time: the one field that differs by design
        exported = {f"export.{k}": v for k, v in load_file(folder / "vae.safetensors").items()}
        return {**_tensors("ckpt", state), **exported}

    a, b = leaves(reference_out), leaves(out)
    if a.keys() != b.keys():
        fig.mismatched.append(f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}")
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            fig.compared += 1
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                fig.mismatched.append(k)
            if x.is_floating_point() and x.shape == y.shape:
                fig.max_abs_diff = max(fig.max_abs_diff, (x.double() - y.double()).abs().max().item())
        elif x != y:
            fig.mismatched.append(k)
    rows = [
        [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (f / "log.jsonl").read_text().splitlines())]
        for f in (reference_out, out)
    ]
    if rows[0] != rows[1]:
        fig.mismatched.append("log.jsonl")
    for folder in (out, out / "checkpoints"):
        fig.leftovers += [p.name for p in folder.iterdir() if p.name.startswith(".")]


def run(workdir: Path, kills: int, seed: int, steps: int = 40, plan_: list[Kill] | None = None) -> Figures:
    data = make_data(workdir / "data")
    t0 = time.perf_counter()
    timings = reference(data, workdir / "reference", steps)
    reference_wall = time.perf_counter() - t0
    moments = plan_ if plan_ is not None else plan(kills, steps, random.Random(seed))
    fig = chaos(data, workdir / "chaos", steps, moments, timings)
    fig.reference_wall = reference_wall
    compare(workdir / "reference", workdir / "chaos", steps, fig)
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40, help=f"training steps (a checkpoint every {EVERY})")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="a line per kill")
    args = ap.parse_args()
    if args.steps % EVERY:
        ap.error(f"--steps must be a multiple of {EVERY}")
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=False)
        fig = run(Path(args.keep), args.kills, args.seed, args.steps)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fig = run(Path(tmp), args.kills, args.seed, args.steps)
    print(f"chaos_train: {args.kills} kills planned, seed {args.seed}, {args.steps} steps")
    for line in [*(fig.trace if args.verbose else []), *fig.lines()]:
        print("  " + line)
    return 0 if fig.ok else 1


if __name__ == "__main__":
    sys.exit(main())
