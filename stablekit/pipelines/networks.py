"""LoRAs and textual-inversion embeddings on a pipeline.

A pipeline's own LoRAs (``--lora FILE[:WEIGHT]``) and those a prompt names (``<lora:NAME:WEIGHT>``, looked up by
file name in the pipeline's ``lora_dir``) are merged into the torch weights for one run and taken out again
exactly when it ends, however it ends (:class:`~stablekit.prompts.lora.LoraMerge` keeps the originals). A run's
prompts must name the same LoRAs: they share one set of weights. Embeddings are added once, for the pipeline's
life. Both change the torch modules, so the OpenVINO engine, whose networks are compiled, refuses them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stablekit.engines.eager import TorchEngine
from stablekit.prompts.extra_networks import LoraTag, split_lora_tags
from stablekit.prompts.lora import LoraMerge
from stablekit.weights.embeddings import add_embeddings, check_width, read_embedding
from stablekit.weights.lora import Lora, read_lora

if TYPE_CHECKING:
    from stablekit.pipelines.core import Pipeline

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")


def _torch_only(pipe: Pipeline, what: str) -> TorchEngine:
    if not isinstance(pipe.engine, TorchEngine):
        raise ValueError(
            f"{what} change the model's weights: use --engine torch (the {pipe.engine.name} engine's "
            "networks are compiled)"
        )
    return pipe.engine


def parse_lora_option(text: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight); a path that itself holds ':' keeps it unless the tail is a number."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def find_lora(folder: Path | None, name: str) -> Path:
    """The LoRA file named ``name`` (its stem, any case) anywhere under ``folder``, as A1111 finds it."""
    if folder is None:
        raise ValueError(f"LoRA tags need a LoRA folder (--lora-dir) to look <lora:{name}> up in")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.stem.lower() == name.lower())
    if not found:
        raise ValueError(f"LoRA {name!r} not found in {folder}")
    if len(found) > 1:
        raise ValueError(
            f"LoRA {name!r} is ambiguous: {len(found)} files in {folder} ({', '.join(map(str, found[:3]))})"
        )
    return found[0]


def prompt_loras(pipe: Pipeline, prompts: Sequence[str]) -> tuple[list[str], tuple[LoraTag, ...]]:
    """(the prompts without their tags, the one set of LoRA tags they share); every named LoRA must exist."""
    split = [split_lora_tags(p) for p in prompts]
    sets = {tags for _, tags in split}
    if len(sets) > 1:
        raise ValueError("LoRA tags differ between the prompts of one run; run them separately")
    tags = sets.pop() if sets else ()
    if tags:
        _torch_only(pipe, "LoRAs")
        for name, _ in tags:
            find_lora(pipe.lora_dir, name)
    return [text for text, _ in split], tags


@contextlib.contextmanager
def loras_merged(pipe: Pipeline, tags: tuple[LoraTag, ...]) -> Iterator[None]:
    """The pipeline's LoRAs and ``tags``' merged for the block; without any, nothing happens."""
    if not pipe.loras and not tags:
        yield
        return
    model = _torch_only(pipe, "LoRAs").model
    chosen: list[tuple[Lora, float]] = list(pipe.loras)
    chosen += [(read_lora(find_lora(pipe.lora_dir, name), model), weight) for name, weight in tags]
    with LoraMerge(model, chosen):
        yield


def add_lora(pipe: Pipeline, path: str | os.PathLike[str], weight: float = 1.0) -> None:
    """Turn the LoRA at ``path`` on for every run of ``pipe`` (read and checked now, merged per run)."""
    model = _torch_only(pipe, "LoRAs").model
    pipe.loras.append((read_lora(path, model), weight))


def add_embedding_files(pipe: Pipeline, paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Load textual-inversion embeddings into ``pipe`` for its lifetime; their trigger words, in order. An entry
    ``FILE=WORD`` calls the file's embedding by WORD; otherwise it is called by its own token (a diffusers file) or
    its file name. A folder contributes every embedding file in it, each named by its file name (as A1111's
    embeddings folder)."""
    engine = _torch_only(pipe, "embeddings")
    chosen: list[tuple[Path, str | None]] = []
    for entry in map(str, paths):
        path, sep, word = entry.rpartition("=") if "=" in Path(entry).name else (entry, "", "")
        p = Path(path)
        if p.is_dir():
            if sep:
                raise ValueError(f"--embedding {entry}: a folder's embeddings are called by their file names")
            chosen += [(f, None) for f in sorted(p.iterdir()) if f.suffix.lower() in EMBEDDING_SUFFIXES]
        else:
            chosen.append((p, word.strip() or None))
    embeddings = [read_embedding(f, token=word) for f, word in chosen]
    for e in embeddings:
        check_width(e, pipe.config.text)
    added = add_embeddings(engine.model.cond_stage_model, pipe.tokenizer, embeddings)
    pipe.tokenizer = added.tokenizer
    return [e.name for e in embeddings]
