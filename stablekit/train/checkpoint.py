"""Training checkpoints: written atomically, found again by resume only when complete.

A checkpoint is ``torch.save`` of plain containers and tensors (so it loads with ``weights_only=True``):
written to a temporary name in the same folder, flushed and fsynced, then renamed over its final name, and the
folder is fsynced so the rename itself survives a crash. Resume only considers final names, newest first, and
skips any file that does not load, so neither a half-written temporary file nor a damaged final file is used. A
process killed mid-write leaves its temporary file behind; the next run removes it when it starts.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"ckpt-(\d{8})\.pt")
_TMP = re.compile(r"\.ckpt-\d{8}\.pt\.tmp-(\d+)")  # atomic_save's temporary name: the writer's process id


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` so that ``path`` either holds the whole object or is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint by its final name, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found, reverse=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("complete") is not True:
        raise ValueError(f"{path}: not a complete stablekit training checkpoint")
    return state


def newest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads, with its contents; None when there is none."""
    for _, path in list_checkpoints(folder):
        try:
            return path, load_checkpoint(path)
        except Exception as e:  # a damaged file of any kind: fall back to the one before it
            print(f"stablekit train: skipping unreadable checkpoint {path.name}: {e}", file=sys.stderr)
    return None


def _alive(pid: int) -> bool:
    """Whether another process ``pid`` runs here. This process's own id is a dead writer's: a run removes
    leftovers before it writes anything, and a restarted run can be given its killed predecessor's id."""
    if pid == os.getpid() or sys.platform == "win32":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary files of checkpoint writes that never finished (``.ckpt-*.pt.tmp-PID`` of a process
    no longer running): resume never reads them, but each is a checkpoint's size and restarts would pile them up.
    Returns what was removed; a file that cannot be removed (in use on Windows) stays for a later run."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TMP.fullmatch(p.name)
        if m is not None and not _alive(int(m.group(1))):
            try:
                p.unlink()
            except OSError:
                continue
            removed.append(p)
    return removed


def prune_checkpoints(folder: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Every global random state a training step may touch (python, numpy, torch CPU, each CUDA device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
