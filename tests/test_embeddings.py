"""Textual-inversion embeddings against diffusers' ``load_textual_inversion``, on identical tiny random weights.

diffusers' pipeline (written by its ``save_pretrained``) loads each file with ``load_textual_inversion``; we load the
same folder and file and add the embedding to our text encoder and tokenizer. The token ids of a prompt (diffusers'
``maybe_convert_prompt`` + its tokenizer) must be equal, and the prompt's encoding (``encode_prompt``) within 1e-5.
Files: diffusers' ``learned_embeds.safetensors`` layout ({token: (D,)}), a multi-vector one, and A1111's ``.pt``
written with ``torch.save`` in the layout A1111 saves (``string_to_param``, ``string_to_token``, ``name``, ``step``...).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stablekit.pipelines import Pipeline
from stablekit.pipelines.networks import add_embedding_files
from stablekit.text.tokenizer import default_tokenizer
from stablekit.weights import load_model
from stablekit.weights.embeddings import (
    Embedding,
    EmbeddingError,
    add_embeddings,
    read_embedding,
    token_embedding,
)
from tests.oracles import require
from tests.test_lora import base_pipeline

diffusers = require("diffusers")

PROMPT = "a photo of <cat-toy> next to a bad-hands dog, <wavy-style> in spring"


def _files(root: Path) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(3)
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "single": root / "learned_embeds.safetensors",
        "multi": root / "wavy.safetensors",
        "a1111": root / "bad-hands.pt",
    }
    save_file({"<cat-toy>": torch.randn(32, generator=gen)}, files["single"])
    save_file({"<wavy-style>": torch.randn(4, 32, generator=gen)}, files["multi"])
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(3, 32, generator=gen).requires_grad_()},
            "name": "bad-hands",
            "step": 1500,
            "sd_checkpoint": "a9263745",
            "sd_checkpoint_name": "v1-5-pruned",
        },
        files["a1111"],
    )
    return files


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("embeddings")
    gen = torch.Generator().manual_seed(1234)
    out: dict[str, Any] = {"files": _files(root / "files")}
    for kind in ("sd1", "sd2"):
        _, out[kind] = base_pipeline(root / kind, kind == "sd2", gen)
    return out


def _reference(folder: Path, files: dict[str, Path]) -> Any:
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for path in files.values():
        ref.load_textual_inversion(str(path), weight_name=path.name)
    return ref


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_prompts_with_embeddings_encode_as_diffusers_does(setup: dict[str, Any], kind: str) -> None:
    files: dict[str, Path] = setup["files"]
    ref = _reference(setup[kind], files)
    converted = ref.maybe_convert_prompt(PROMPT, ref.tokenizer)
    want_ids = ref.tokenizer(converted, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        want = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]  # (1, 77, D)

    loaded = load_model(setup[kind])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer or default_tokenizer()
    encoder = model.cond_stage_model
    table = token_embedding(encoder)
    before, rows = table.weight, table.num_embeddings
    embeddings = [read_embedding(p) for p in files.values()]
    assert [e.name for e in embeddings] == ["<cat-toy>", "<wavy-style>", "bad-hands"]
    with add_embeddings(encoder, tokenizer, embeddings) as added:
        assert added.ids == {
            "<cat-toy>": (rows,),
            "<wavy-style>": (rows + 1, rows + 2, rows + 3, rows + 4),
            "bad-hands": (rows + 5, rows + 6, rows + 7),
        }
        ids = added.tokenizer.tokenize(PROMPT, pad_token=model.config.text.pad_token).ids
        with torch.no_grad():
            got = encoder(ids)
    assert ids[0].tolist() == want_ids
    assert (got - want).abs().max().item() <= 1e-5
    assert table.weight is before and table.num_embeddings == rows and encoder.config.vocab_size == rows
    assert not tokenizer.added_tokens  # the caller's tokenizer never changed


def test_a1111_file_reads_through_the_safe_unpickler(setup: dict[str, Any], tmp_path: Path) -> None:
    files: dict[str, Path] = setup["files"]
    want = torch.load(files["a1111"], weights_only=True)["string_to_param"]["*"]
    emb = read_embedding(files["a1111"])
    assert emb.name == "bad-hands" and torch.equal(emb.vectors, want.detach())
    # The original textual_inversion code pickled string_to_param as an nn.ParameterDict (a module we never import).
    legacy = tmp_path / "legacy.pt"
    torch.save({"string_to_param": nn.ParameterDict({"*": nn.Parameter(want.detach())}), "name": "x"}, legacy)
    assert torch.equal(read_embedding(legacy, token="old").vectors, want.detach())


def test_the_trigger_is_the_callers_else_the_files_else_the_stem(setup: dict[str, Any], tmp_path: Path) -> None:
    assert read_embedding(setup["files"]["multi"], token="other").name == "other"
    vectors = torch.randn(2, 32)
    torch.save(vectors, tmp_path / "bare.pt")
    save_file({"emb_params": vectors}, tmp_path / "EasyStyle.safetensors")
    for path, name in ((tmp_path / "bare.pt", "bare"), (tmp_path / "EasyStyle.safetensors", "EasyStyle")):
        emb = read_embedding(path)
        assert emb.name == name and torch.equal(emb.vectors, vectors)


def test_bad_embeddings_are_refused_with_the_reason(setup: dict[str, Any], tmp_path: Path) -> None:
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(EmbeddingError, match="SDXL"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"a": torch.zeros(1, 32), "b": torch.zeros(1, 32)}, tmp_path / "two.safetensors")
    with pytest.raises(EmbeddingError, match="2 entries"):
        read_embedding(tmp_path / "two.safetensors")

    encoder = load_model(setup["sd1"]).model.cond_stage_model
    wide = Embedding("wide", torch.zeros(1, 48), "wide.pt")
    with pytest.raises(EmbeddingError, match="width 48"):
        add_embeddings(encoder, default_tokenizer(), [wide])
    first = add_embeddings(encoder, default_tokenizer(), [Embedding("one", torch.ones(1, 32))])
    with pytest.raises(EmbeddingError, match="already added"):
        add_embeddings(encoder, first.tokenizer, [Embedding("ONE", torch.ones(1, 32))])
    second = add_embeddings(encoder, first.tokenizer, [Embedding("two", torch.ones(2, 32))])
    with pytest.raises(EmbeddingError, match="remove them first"):
        first.remove()
    second.remove()
    first.remove()
    assert token_embedding(encoder).num_embeddings == encoder.config.vocab_size == 49408


def test_added_tokens_decode_and_leave_other_text_alone() -> None:
    tok = default_tokenizer()
    added = tok.with_added_tokens({"<x>": (49408, 49409)})
    plain = tok.tokenize("a red circle", pad_token=0).ids
    assert torch.equal(added.tokenize("a red circle", pad_token=0).ids, plain)
    ids = added.encode("a <X>red circle")
    assert ids == [*tok.encode("a"), 49408, 49409, *tok.encode("red circle")]
    assert added.decode(ids) == "a <x> red circle"


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_a_pipeline_with_embeddings_encodes_as_diffusers_does(setup: dict[str, Any], kind: str) -> None:
    files: dict[str, Path] = setup["files"]
    ref = _reference(setup[kind], files)
    with torch.no_grad():
        want = ref.encode_prompt(PROMPT, "cpu", 1, False)[0]  # (1, 77, D)
    pipe = Pipeline.from_file(setup[kind], device="cpu", dtype=torch.float32)
    assert add_embedding_files(pipe, list(files.values())) == ["<cat-toy>", "<wavy-style>", "bad-hands"]
    again = Pipeline.from_file(setup[kind], device="cpu", dtype=torch.float32)
    assert add_embedding_files(again, [f"{files['single']}=kitty"]) == ["kitty"]  # FILE=WORD
    renamed, _ = again.encode_prompts(["a photo of kitty"])
    got, _ = pipe.encode_prompts([PROMPT])  # through the prompt-language path: chunking, weights
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(renamed, pipe.encode_prompts(["a photo of <cat-toy>"])[0])  # the same vector, another word


def test_cli_embedding_folder(setup: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    for path in setup["files"].values():
        shutil.copy(path, folder / path.name)
    run = [sys.executable, "-c", "import sys; from stablekit.cli import main; sys.exit(main())", "generate"]
    out = subprocess.run(
        [
            *run,
            PROMPT,
            "-m",
            str(setup["sd1"]),
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "1",
            "--embedding",
            str(folder),
            "-o",
            str(tmp_path / "a.png"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "embeddings loaded, called by:" in out.stderr and (tmp_path / "a.png").exists()
