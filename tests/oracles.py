"""Reference implementations used as test oracles.

``open_clip/__init__`` imports torchvision, which cannot be imported beside this torch. Its tokenizer and
text transformer need neither, so :func:`open_clip_module` registers a bare ``open_clip`` package (no
``__init__`` run) and imports the one submodule. ``open_clip.utils`` imports one torchvision class at module
level that the text tower never uses; unless a real torchvision is already imported, a stand-in is put in
``sys.modules`` for that import only and removed again, so nothing else sees a fake torchvision.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest


def require(name: str) -> types.ModuleType:
    """Import a reference library, failing (never skipping) when it is absent: a parity test that quietly
    skips proves nothing, and `make install` puts every oracle in .venv."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"test oracle {name!r} cannot be imported ({e}); run `make install`", pytrace=False)


def bare_package(package: str, hint: str) -> None:
    """Register ``package`` without running its ``__init__`` (which imports what this environment lacks), so its
    submodules import alone; the test fails with ``hint`` if the package is not installed."""
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        pytest.fail(f"test oracle {hint}", pytrace=False)
    module = types.ModuleType(package)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[package] = module


def import_beside(full: str, stand_in: dict[str, types.ModuleType]) -> types.ModuleType:
    """Import module ``full`` with ``stand_in`` modules present only while it imports."""
    if full in sys.modules:
        return sys.modules[full]
    added = [k for k in stand_in if k not in sys.modules]
    sys.modules.update({k: stand_in[k] for k in added})
    try:
        return importlib.import_module(full)
    finally:
        for k in added:
            del sys.modules[k]


class _NoFrozenBatchNorm:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision stand-in: FrozenBatchNorm2d is not available in tests")


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = _NoFrozenBatchNorm  # type: ignore[attr-defined]
    ops = types.ModuleType("torchvision.ops")
    ops.misc = misc  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": root, "torchvision.ops": ops, "torchvision.ops.misc": misc}


def open_clip_module(name: str) -> types.ModuleType:
    """``open_clip.<name>`` (e.g. ``tokenizer``, ``transformer``); the test fails if the wheel is absent."""
    hint = "open_clip_torch is not installed; run `make install` (it installs open_clip_torch==3.3.0 with --no-deps)"
    bare_package("open_clip", hint)
    return import_beside(f"open_clip.{name}", _torchvision_stand_in())


def hf_clip_tokenizer(folder: Path, *, pad_token: str | None = None):  # type: ignore[no-untyped-def]
    """A transformers ``CLIPTokenizer`` with vocab.json/merges.txt built from our shipped BPE file, as the
    Hub's openai/clip-vit-large-patch14 files are: 256 byte symbols, the same with ``</w>``, the merges
    joined, then the two specials (49408 in all). ``pad_token="!"`` gives the SD2 tokenizer."""
    transformers = require("transformers")
    from stablekit.text.tokenizer import _VOCAB_FILE

    bytes_to_unicode = open_clip_module("tokenizer").bytes_to_unicode
    merges = gzip.decompress(_VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")[1:48895]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    extra = {"pad_token": pad_token} if pad_token is not None else {}
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **extra)
    assert len(tok) == 49408
    return tok


TINY_SPECIALS = ["<|startoftext|>", "<|pad|>", "<|endoftext|>"]  # ids 0, 1, 2: diffusers' fixtures' bos/pad/eos


def tiny_clip_tokenizer(folder: Path, *, pad: str = "<|pad|>", size: int = 1000):  # type: ignore[no-untyped-def]
    """transformers' ``CLIPTokenizer`` over a ``size``-entry byte-level BPE vocabulary written to ``folder`` as
    vocab.json + merges.txt, in place of diffusers' ``hf-internal-testing/tiny-random-clip`` (1000 tokens, not
    downloadable here). Its ids are unlike CLIP's: the three specials first, then the 256 byte symbols, the same
    ending a word, then the first of OpenAI CLIP's merges (each merge only joins symbols made before it, so any
    prefix of the list makes a whole vocabulary)."""
    transformers = require("transformers")
    from stablekit.text.tokenizer import _VOCAB_FILE

    base = list(open_clip_module("tokenizer").bytes_to_unicode().values())
    lines = gzip.decompress(_VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + size - len(TINY_SPECIALS) - 2 * len(base)]
    tokens = TINY_SPECIALS + base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    assert len(tokens) == len(set(tokens)) == size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
    )
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token, len(tok)) == (0, 2, pad, size)
    return tok
