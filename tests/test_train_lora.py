"""LoRA training: the targets and their initial no-op, the export merged by ``LoraMerge`` against the trained
forward (SD1, and SD2's fused q/k/v), diffusers' ``load_lora_weights`` reading the file, the loss falling, exact
resume on a captioned data set, and the CLI's one-line errors."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from stablekit.cli import main
from stablekit.config import ModelConfig
from stablekit.models.ldm import LatentDiffusion
from stablekit.prompts.lora import LoraMerge
from stablekit.train.dreambooth import DreamBooth
from stablekit.train.lora import FILE, LORA_TRAIN, LoraSpec, LoraStage, train_lora
from stablekit.train.stages import StepContext
from stablekit.train.trainer import TrainConfig
from stablekit.weights import save_model
from stablekit.weights.lora import read_lora
from tests.oracles import require
from tests.test_dreambooth import _instances
from tests.tiny import TINY_SD1, TINY_SD2

SMALL = replace(TINY_SD1, name="tiny-lora", default_size=32, default_steps=2, default_sampler="euler")
KOHYA = re.compile(
    r"lora_(unet_.*_attn[12]_(to_q|to_k|to_v|to_out_0)|te_text_model_.*_self_attn_(q|k|v|out)_proj)"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)"
)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_model(LatentDiffusion(SMALL), SMALL, path)
    return path


def _images(folder: Path, n: int = 3, *, captions: bool = False) -> Path:
    _instances(folder, n)
    if captions:
        for i in range(n):
            (folder / f"{i}.txt").write_text(f"a sks shape, number {i}")
    return folder


def _quick(**kw: Any) -> TrainConfig:
    return replace(LORA_TRAIN, **{"progress": False, "lr": 1e-2, **kw})


def _inputs(config: ModelConfig, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, config.unet.context_dim, generator=g)
    ids = torch.randint(1, config.text.vocab_size, (2, config.text.context_length), generator=g)
    return x, ctx, ids


@torch.no_grad()
def _outputs(model: LatentDiffusion, config: ModelConfig) -> tuple[Tensor, Tensor]:
    x, ctx, ids = _inputs(config)
    return model.unet(x, torch.tensor([10, 700]), ctx), model.text_encoder(ids)


def _randomize(stage: LoraStage, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _keys(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)


# --- targets, export, merge --------------------------------------------------------------------------------


def test_only_attention_factors_train_and_start_as_a_no_op() -> None:
    torch.manual_seed(0)
    model = LatentDiffusion(SMALL)
    before = _outputs(model, SMALL)
    stage = LoraStage(model, SMALL, rank=3)
    names = list(stage.module.keys())
    # Every transformer block gives attn1 and attn2, four projections each.
    blocks = [n for n, _ in model.unet.named_modules() if n.endswith("transformer_blocks.0")]
    assert blocks and len(names) == 8 * len(blocks)
    assert all(re.fullmatch(r"lora_unet_.*_attn[12]_(to_q|to_k|to_v|to_out_0)", n) for n in names)
    assert {p.shape[0] for n, p in stage.module.named_parameters() if n.endswith(".down")} == {3}
    assert all(not p.any() for n, p in stage.module.named_parameters() if n.endswith(".up"))
    assert all(p.requires_grad for p in stage.module.parameters())
    trained = {id(p) for p in stage.module.parameters()}
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trained)
    after = _outputs(model, SMALL)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


@pytest.mark.parametrize("config", [SMALL, TINY_SD2], ids=["sd1", "sd2-fused-qkv"])
def test_export_merged_by_lora_merge_is_the_trained_forward(config: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LatentDiffusion(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    stage = LoraStage(model, config, rank=4, alpha=2.0, train_text_encoder=True)
    _randomize(stage)
    trained = _outputs(model, config)
    [path] = stage.export(dict(stage.module.state_dict()), tmp_path, [])
    assert path == tmp_path / FILE
    keys = _keys(path)
    assert all(KOHYA.fullmatch(k) for k in keys), [k for k in keys if not KOHYA.fullmatch(k)][:3]
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert all(shape[0] == 4 for k, shape in keys.items() if k.endswith("lora_down.weight"))
    assert all(shape[1] == 4 for k, shape in keys.items() if k.endswith("lora_up.weight"))
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")} == {2.0}

    fresh = LatentDiffusion(config)
    fresh.load_state_dict(base)
    plain = _outputs(fresh, config)
    lora = read_lora(path, fresh)
    assert len(lora.layers) == len(stage.module)
    with LoraMerge(fresh, [(lora, 1.0)]):
        merged = _outputs(fresh, config)
    for got, want, untouched in zip(merged, trained, plain, strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert not torch.allclose(untouched, want, atol=1e-3)  # the update is not negligible


def test_diffusers_load_lora_weights_reads_the_export(small_model: Path, tmp_path: Path) -> None:
    diffusers = require("diffusers")
    from stablekit.weights import load_model
    from stablekit.weights.diffusers import write_folder

    loaded = load_model(small_model)
    stage = LoraStage(loaded.model, loaded.config, rank=4, alpha=8.0, train_text_encoder=True)
    _randomize(stage, seed=2)
    [path] = stage.export(dict(stage.module.state_dict()), tmp_path, [])
    unet_out, text_out = _outputs(loaded.model, SMALL)

    write_folder(tmp_path / "config", SMALL, {}, weights=False)
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(small_model), config=str(tmp_path / "config"), local_files_only=True
    )
    pipe.load_lora_weights(str(path))
    x, ctx, ids = _inputs(SMALL)
    with torch.no_grad():
        ref_unet = pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx).sample
        ref_text = pipe.text_encoder(ids).last_hidden_state
    assert torch.allclose(ref_unet, unet_out, atol=1e-5), (ref_unet - unet_out).abs().max()
    assert torch.allclose(ref_text, text_out, atol=1e-5), (ref_text - text_out).abs().max()


# --- training ------------------------------------------------------------------------------------------------


def test_cli_dreambooth_lora_lowers_the_loss(small_model: Path, tmp_path: Path) -> None:
    """The step loss on fixed noise and timesteps (the same batch and draws before and after) falls."""
    from stablekit.train.dreambooth import collate_pairs, paired_data
    from stablekit.weights import load_model

    inst, run = _images(tmp_path / "inst"), tmp_path / "run"
    args = ["train", "lora", "--model", str(small_model), "--instance-data", str(inst), "--out", str(run)]
    flags = ["--instance-prompt", "a sks shape", "--class-prompt", "a shape", "--num-class-images", "3"]
    train = ["--steps", "30", "--batch-size", "3", "--lr", "1e-2", "--rank", "2", "--no-progress"]
    assert main([*args, *flags, *train]) == 0
    assert (run / "loss.png").is_file() and len((run / "log.jsonl").read_text().splitlines()) == 3
    keys = _keys(run / FILE)
    assert all(k.startswith("lora_unet_") and KOHYA.fullmatch(k) for k in keys)
    assert all(shape[0] == 2 for k, shape in keys.items() if k.endswith("lora_down.weight"))
    out = tmp_path / "o.png"
    assert (
        main(["generate", "a sks shape", "--model", str(small_model), "--lora", f"{run / FILE}:1", "-o", str(out)]) == 0
    )
    assert out.is_file()

    loaded = load_model(small_model)
    stage = LoraStage(loaded.model, loaded.config, rank=2)
    data, _ = paired_data(small_model, run, DreamBooth(inst, "a sks shape", ("a shape",), 3), 0, 32)
    batch = collate_pairs([data[i] for i in range(3)])

    def loss() -> float:
        ctxs = [StepContext(9, s, slice(0, 3), 3, 1, 1, torch.device("cpu"), lambda x: x) for s in range(8)]
        with torch.no_grad():
            return sum(stage.loss(batch, c)[1].item() for c in ctxs)

    before = loss()  # up = 0: the base model
    file = load_file(run / FILE)
    parts = {"down": "lora_down.weight", "up": "lora_up.weight"}
    stage.module.load_state_dict({f"{n}.{p}": file[f"{n}.{k}"] for n in stage.module for p, k in parts.items()})
    after = loss()
    assert after < 0.9 * before, (before, after)


def test_resume_on_a_captioned_data_set_is_exact(small_model: Path, tmp_path: Path) -> None:
    spec = LoraSpec(_images(tmp_path / "data", 4, captions=True), rank=2, train_text_encoder=True)
    cfg = _quick(steps=4, batch_size=2, checkpoint_every=2, log_every=1)
    straight, report = train_lora(small_model, tmp_path / "straight", spec, cfg)
    assert report["examples"] == 4 and report["rank"] == 2 and report["alpha"] == 2.0
    train_lora(small_model, tmp_path / "split", spec, replace(cfg, steps=2))
    resumed, _ = train_lora(small_model, tmp_path / "split", spec, cfg, resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    # Tensors and metadata, not bytes: safetensors writes the metadata's keys in a hash map's order.
    a, b = (load_file(tmp_path / run / FILE) for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ups = [v for k, v in a.items() if k.endswith("lora_up.weight")]
    assert all(v.any() for v in ups)  # every module trained, the text encoder's too
    assert any(k.startswith("lora_te_") for k in a)
    logs = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        for run in ("straight", "split")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 4


@pytest.mark.parametrize(
    "argv",
    [
        ["--instance-data", "{inst}", "--instance-prompt", "a sks dog", "--no-model"],  # no --model
        ["--instance-prompt", "a sks dog"],  # neither --instance-data nor --data
        ["--instance-data", "{inst}", "--data", "{inst}"],  # both
        ["--data", "{inst}", "--class-prompt", "a dog"],  # class prior without DreamBooth data
        ["--instance-data", "{inst}", "--instance-prompt", "a sks dog", "--rank", "0"],
        ["--instance-data", "{inst}", "--instance-prompt", "a sks dog", "--alpha", "-1"],
        ["--instance-data", "{missing}", "--instance-prompt", "a sks dog"],
        ["--instance-data", "{inst}"],  # images without captions and no prompt
    ],
)
def test_cli_errors_are_one_line(
    small_model: Path, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    inst = _images(tmp_path / "inst", n=1)
    argv = [a.format(missing=tmp_path / "nope", inst=inst) for a in argv]
    model = [] if "--no-model" in argv else ["--model", str(small_model)]
    argv = [a for a in argv if a != "--no-model"]
    assert main(["train", "lora", *model, "--out", str(tmp_path / "run"), *argv]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
