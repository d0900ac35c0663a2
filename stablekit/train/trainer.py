"""The training loop shared by every stage: data order, AdamW with warm-up, accumulation, mixed precision,
EMA, several processes, atomic checkpoints and exact resume, progress and logs.

Data order: epoch e visits the dataset in ``randperm(N)`` seeded by (seed, e); each optimizer step takes the
next ``batch_size · grad_accum`` indices (a remainder too small for a step is skipped), micro-batch m takes
the m-th ``batch_size`` of them and process r its r-th ``batch_size / world`` slice of that. The position
(epoch, index) is saved in the checkpoint, as are the global random states; the losses draw their random
numbers from a generator seeded by (seed, step) (see :class:`~stablekit.train.stages.StepContext`), so a
resumed run continues exactly as the uninterrupted one and a run on several processes equals one process
at the same global batch.

Several processes: launched by ``torchrun`` (``env://`` init, gloo on CPU, nccl on CUDA); gradients are
summed across processes by an explicit all-reduce after the last micro-batch, so every process applies the
same update. Only rank 0 writes checkpoints, logs and exported models.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from stablekit.atomic import replacing_file
from stablekit.train.checkpoint import (
    atomic_save,
    checkpoint_path,
    newest_checkpoint,
    prune_checkpoints,
    remove_leftovers,
    rng_state,
    set_rng_state,
)
from stablekit.train.ema import EMA
from stablekit.train.footprint import Footprint, FootprintSettings, Meter
from stablekit.train.plot import plot_loss
from stablekit.train.stages import Batch, Stage, StepContext

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class Dataset(Protocol):
    """Map-style: ``len`` and integer indexing (``stablekit.train.data.ImageCaptionDataset``, or a list)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


Collate = Callable[[list[Any]], Batch]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # examples per micro-batch over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup: int = 10_000  # steps of linear warm-up to ``lr`` (the SD cards: 10,000 to 1e-4), then constant
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    ema_decay: float = 0.9999
    # Largest global gradient norm (None: no clipping). Caps the rare outlier step that would knock a run off
    # a plateau it does not come back to before the EMA has averaged the damage in.
    grad_clip: float | None = None
    # "auto": bf16 autocast on CUDA where supported, else fp16 with loss scaling; fp32 on CPU (CPU autocast
    # is slower than fp32 on the machines this targets).
    precision: Precision = "auto"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.grad_accum, self.log_every, self.checkpoint_every) < 1:
            raise ValueError("steps, batch_size, grad_accum, log_every and checkpoint_every must be positive")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError("lr must be positive and warmup non-negative")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive (or None for no clipping), got {self.grad_clip}")


@dataclass
class Summary:
    steps: int
    resumed_from: int  # 0 for a fresh run
    final_loss: float  # mean over the last logged interval
    seconds: float  # wall time of this run (not counting the part before a resume)
    exported: list[Path]
    precision: str
    footprint: dict[str, Any] | None = None  # footprint.json's content over every session (rank 0 only)


def default_collate(items: list[Any]) -> Batch:
    images, captions = zip(*items, strict=True)
    return torch.stack(list(images)), list(captions)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then held."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


def permutation(seed: int, epoch: int, n: int) -> Tensor:
    state = int(np.random.SeedSequence([seed, 1, epoch]).generate_state(1, np.uint64)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state & (2**63 - 1)))


def _resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return (dist.get_rank() if world > 1 else 0), world, device


class _Gather(torch.autograd.Function):
    """all_gather whose gradient is this process's slice of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _gather(x: Tensor) -> Tensor:
    return _Gather.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


class Trainer:
    """Trains ``stage.module`` on ``dataset`` (a sequence of items that ``collate`` turns into a batch)."""

    def __init__(
        self,
        stage: Stage,
        dataset: Dataset,
        cfg: TrainConfig,
        out: str | Path,
        *,
        collate: Collate = default_collate,
        footprint: FootprintSettings | None = None,
    ) -> None:
        self.stage, self.dataset, self.cfg, self.collate = stage, dataset, cfg, collate
        self.footprint_settings = footprint or FootprintSettings()
        self.out = Path(out)
        self.rank, self.world, self.device = init_distributed()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch size {cfg.batch_size} does not split over {self.world} processes")
        if len(dataset) < cfg.batch_size * cfg.grad_accum:
            raise ValueError(f"{len(dataset)} examples are fewer than one step's {cfg.batch_size * cfg.grad_accum}")
        self.dtype = _resolve_precision(cfg.precision, self.device)
        stage.to(self.device)
        self.module = stage.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr_at(cfg, 0), betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.ema = EMA(self.module, cfg.ema_decay)
        self.step, self.epoch, self.index = 0, 0, 0
        self.resumed_from = 0
        # Training wall time of the runs before this one (from the checkpoint), so logged times add up over resumes.
        self.seconds_before = 0.0
        self._started = time.perf_counter()
        self.ckpt_dir = self.out / "checkpoints"
        self.log_path = self.out / "log.jsonl"

    # --- state -----------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "complete": True,
            "stage": self.stage.name,
            "step": self.step,
            "data": {"epoch": self.epoch, "index": self.index},
            "module": self.module.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "train_config": asdict(self.cfg),
            "seconds": self.elapsed(),
        }

    def save(self) -> Path:
        path = checkpoint_path(self.ckpt_dir, self.step)
        atomic_save(self.state(), path)
        prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
        return path

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint in ``out``; False when there is none."""
        found = newest_checkpoint(self.ckpt_dir)
        if found is None:
            return False
        path, state = found
        if state["stage"] != self.stage.name:
            raise ValueError(f"{path} is a {state['stage']} checkpoint, not {self.stage.name}")
        self.module.load_state_dict(state["module"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step, self.epoch, self.index = state["step"], state["data"]["epoch"], state["data"]["index"]
        self.resumed_from = self.step
        self.seconds_before = float(state.get("seconds", 0.0))
        return True

    # --- data ------------------------------------------------------------------------------------------------

    def _step_indices(self) -> Tensor:
        """The next optimizer step's dataset indices, advancing the (epoch, index) position."""
        need = self.cfg.batch_size * self.cfg.grad_accum
        if self.index + need > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        idx = permutation(self.cfg.seed, self.epoch, len(self.dataset))[self.index : self.index + need]
        self.index += need
        return idx

    def _micro_batches(self, idx: Tensor) -> Iterator[tuple[Batch, slice]]:
        b = self.cfg.batch_size // self.world
        for m in range(self.cfg.grad_accum):
            rows = slice(m * self.cfg.batch_size + self.rank * b, m * self.cfg.batch_size + (self.rank + 1) * b)
            yield self.collate([self.dataset[int(i)] for i in idx[rows]]), rows

    # --- the loop --------------------------------------------------------------------------------------------

    def _train_step(self) -> float:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        share = torch.zeros((), device=self.device, dtype=torch.float64)
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        for batch, rows in self._micro_batches(self._step_indices()):
            ctx = StepContext(
                seed=cfg.seed,
                step=self.step,
                rows=rows,
                total=cfg.batch_size * cfg.grad_accum,
                accum=cfg.grad_accum,
                world=self.world,
                device=self.device,
                gather=_gather,
            )
            with autocast:
                loss, value = self.stage.loss(batch, ctx)
            self.scaler.scale(loss).backward()
            share += value.double()
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for p, g in zip(self.params, flat.split([g.numel() for g in grads]), strict=True):
                p.grad = g.view_as(p)
            dist.all_reduce(share)
        if cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16 loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.module)
        self.step += 1
        return float(share)

    def fit(self, *, resume: bool = False) -> Summary:
        cfg, main = self.cfg, self.rank == 0
        if not resume and newest_checkpoint(self.ckpt_dir) is not None:
            # A fresh run would interleave its checkpoints with the old run's, and a later resume could pick those.
            raise ValueError(f"{self.ckpt_dir} holds checkpoints of an earlier run: resume it, or use another folder")
        if not (resume and self.resume()):
            # Python's and numpy's global states start from os.urandom in each process; seeded, two runs of one
            # config save (and their resumed runs restore) the same states. torch's is the caller's: it seeded it
            # before drawing the initial weights.
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            self._trim_log()
        footprint = Footprint(self.out, Meter(self.footprint_settings)) if main else None
        if footprint is not None:
            footprint.start(resume=resume)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (main and cfg.progress),
            desc=self.stage.name,
            dynamic_ncols=True,
        )
        start = self._started = time.perf_counter()
        window: list[float] = []
        logged = self._read_log() if main else []
        last = logged[-1]["loss"] if logged else float("nan")  # a run resumed at its end reports where it ended
        while self.step < cfg.steps:
            window.append(self._train_step())
            if footprint is not None:
                footprint.meter.poll()  # RAPL counters wrap: read them every step
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last = sum(window) / len(window)
                window = []
                bar.set_postfix(loss=f"{last:.4g}", lr=f"{lr_at(cfg, self.step - 1):.2e}")
                if main:
                    self._log(last)
            if main and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save()
                self._plot()
                if footprint is not None:
                    footprint.write()
        bar.close()
        exported: list[Path] = []
        spent: dict[str, Any] | None = None
        if main:
            exported = self.stage.export(self.ema.weights(self.module), self.out, self._export_data())
        if footprint is not None:
            spent = footprint.write()
            print(
                f"footprint: {spent['energy_kwh']:.3g} kWh, {spent['carbon_emitted_kg']:.3g} kg CO2 eq. "
                f"({spent['method']}); {self.out / 'footprint.md'}",
                file=sys.stderr,
            )
        if self.world > 1:
            dist.barrier()
        return Summary(
            steps=self.step,
            resumed_from=self.resumed_from,
            final_loss=last,
            seconds=time.perf_counter() - start,
            exported=exported,
            precision=str(self.dtype).removeprefix("torch."),
            footprint=spent,
        )

    def _export_data(self) -> Iterator[Batch]:
        """A few fixed batches, spread over the dataset, for what an export measures (the VAE's latent scale)."""
        b = self.cfg.batch_size
        order = torch.linspace(0, len(self.dataset) - 1, min(len(self.dataset), 8 * b)).long()
        for start in range(0, min(len(order), 8 * b), b):
            yield self.collate([self.dataset[int(i)] for i in order[start : start + b]])

    # --- logs ------------------------------------------------------------------------------------------------

    def _read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        rows = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # half a line, left by a crash mid-append (power loss, a full disk)
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def _trim_log(self) -> None:
        """Drop lines past the step resumed from (they belong to the interrupted run's lost steps) and torn ones.
        Rewritten under a temporary name: a run killed here must not lose the log of the steps it keeps."""
        rows = [r for r in self._read_log() if r["step"] <= self.step]
        with replacing_file(self.log_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _remove_leftovers(self) -> None:
        """Temporary files of writes a killed process never finished: checkpoints (see ``remove_leftovers``) and
        exports, the log and the plot (``stablekit.atomic``'s ``.NAME.*.partial``). Only this run writes here."""
        remove_leftovers(self.ckpt_dir)
        for p in self.out.glob(".*.partial"):
            with contextlib.suppress(OSError):
                p.unlink()

    def elapsed(self) -> float:
        """Training wall time so far, over this run and every run it resumed."""
        return self.seconds_before + time.perf_counter() - self._started

    def _log(self, loss: float) -> None:
        row = {"step": self.step, "loss": loss, "lr": lr_at(self.cfg, self.step - 1), "time": round(self.elapsed(), 3)}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _plot(self) -> None:
        rows = self._read_log()
        plot_loss([r["step"] for r in rows], [r["loss"] for r in rows], self.out / "loss.png", title=self.stage.name)
