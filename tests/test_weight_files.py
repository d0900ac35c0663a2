"""diffusers folders in every form ``save_pretrained`` writes them: plain, ``variant="fp16"`` only, sharded by a
small ``max_shard_size`` (plain and fp16), and pickled ``.bin`` (``safe_serialization=False``; the text encoder's
``pytorch_model.bin`` as transformers 4 wrote it, since transformers 5 writes safetensors only). Each must load to
exactly the tensors of the plain folder (cast to fp16 for the fp16 variant), which the parity tests compare with
diffusers' images. Also the index files that lie: a shard outside the folder, a missing shard, a tensor in none.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stablekit.weights import load_model
from stablekit.weights.components import find_weights
from stablekit.weights.load import CheckpointError
from tests.oracles import hf_clip_tokenizer, require
from tests.test_tasks_parity import _perturb, _text_encoder, _unet, _vae

diffusers = require("diffusers")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    gen = torch.Generator().manual_seed(3)
    unet, vae, text = _unet(4), _vae([32, 64]), _text_encoder(openclip=False)
    for m in (unet, vae, text):
        _perturb(m, gen)
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        unet=unet,
        tokenizer=hf_clip_tokenizer(tmp_path_factory.mktemp("tok")),
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def plain(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("plain")
    pipe.save_pretrained(folder)
    return load_model(folder, dtype=None).model.state_dict()


def _same(folder: Path, want: dict[str, torch.Tensor], dtype: torch.dtype, **kw: Any) -> list[str]:
    loaded = load_model(folder, dtype=None, **kw)
    got = loaded.model.state_dict()
    for key, t in want.items():
        if key in loaded.absent:
            continue
        expect = t.to(dtype) if t.is_floating_point() else t
        assert got[key].dtype == expect.dtype and torch.equal(got[key], expect), key
    return loaded.notes


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_fp16_variant_only_is_picked_up_and_said(pipe: Any, plain: dict, tmp_path: Path, shard: str | None) -> None:
    kw = {"max_shard_size": shard} if shard else {}
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(tmp_path, variant="fp16", **kw)
    names = {p.name for p in (tmp_path / "unet").iterdir()}
    assert (shard is None) == ("diffusion_pytorch_model.fp16.safetensors" in names), names
    notes = _same(tmp_path, plain, torch.float16)
    assert any("only the fp16 variant is present" in n for n in notes), notes


def test_sharded_folder_loads_every_shard(pipe: Any, plain: dict, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path, max_shard_size="60KB")
    unet = tmp_path / "unet"
    assert (unet / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(unet.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 2
    _same(tmp_path, plain, torch.float32)


def test_bin_weights_load_through_the_safe_unpickler(pipe: Any, plain: dict, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    text = tmp_path / "text_encoder"
    for p in text.glob("model*.safetensors"):
        p.unlink()
    torch.save(pipe.text_encoder.state_dict(), text / "pytorch_model.bin")
    _same(tmp_path, plain, torch.float32)


def test_a_named_variant_is_preferred_and_a_missing_one_refused(pipe: Any, plain: dict, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    # Beside the plain files, as Hub repos hold both.
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    unet = str(tmp_path / "unet")
    assert find_weights(unet, ["diffusion_pytorch_model"])[0][0].endswith("model.safetensors")
    assert find_weights(unet, ["diffusion_pytorch_model"], "fp16")[0][0].endswith("model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="no weights of the bf16 variant.*variants present: fp16"):
        find_weights(unet, ["diffusion_pytorch_model"], "bf16")


def _index(folder: Path) -> tuple[Path, dict[str, Any]]:
    path = folder / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, k: m.__setitem__(k, "../../evil.safetensors"), "not a file in this folder"),
        (lambda m, k: m.__setitem__(k, "/etc/passwd"), "not a file in this folder"),
        (lambda m, k: m.__setitem__(k, "diffusion_pytorch_model-09999-of-09999.safetensors"), "is missing"),
        (lambda m, k: m.__setitem__("not.a.real.tensor", m[k]), "in no shard"),
        (lambda m, k: m.__delitem__(k), "is not listed for this shard"),
    ],
)
def test_an_index_that_lies_is_refused(pipe: Any, tmp_path: Path, edit: Any, message: str) -> None:
    pipe.save_pretrained(tmp_path, max_shard_size="60KB")
    path, index = _index(tmp_path)
    edit(index["weight_map"], next(iter(index["weight_map"])))
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_variant_flag_picks_the_variant_through_every_entry_point(
    pipe: Any, plain: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stablekit.cli import main

    pipe.save_pretrained(tmp_path)
    copy.deepcopy(pipe).to(torch.float16).save_pretrained(tmp_path, variant="fp16")
    _same(tmp_path, plain, torch.float16, variant="fp16")
    _same(tmp_path, plain, torch.float32)  # the plain files when no variant is asked for
    assert main(["info", str(tmp_path), "--variant", "fp16"]) == 0
    assert "float16" in capsys.readouterr().out
    assert main(["info", str(tmp_path), "--variant", "bf16"]) == 1
    assert "variants present: fp16" in capsys.readouterr().err
    single = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="single file"):
        load_model(single, variant="fp16")
