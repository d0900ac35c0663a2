"""The trainer: training targets against diffusers, closed-form pieces (warm-up, EMA, contrastive loss), the
equivalence of gradient accumulation with a larger batch, caption dropout, and what the stages export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stablekit.config import ModelConfig
from stablekit.diffusion import Denoiser, alphas_cumprod, training_target
from stablekit.models.clip_image import CLIPConfig, ImageTowerConfig, contrastive_loss
from stablekit.models.ldm import LatentDiffusion
from stablekit.train.ema import EMA
from stablekit.train.stages import CLIPStage, Stage, StepContext, UNetStage, VAEStage, assemble
from stablekit.train.trainer import TrainConfig, Trainer, lr_at
from stablekit.weights import load_model
from tests.tiny import TINY_SD1, TINY_SD2_V

SIZE = 32  # the tiny VAE is f=2: 16x16 latents
CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle on a black background"]


def toy_data(n: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    """A stand-in dataset: smooth random images in [-1, 1] with captions (items for ``default_collate``)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return [(images[i], CAPTIONS[i % len(CAPTIONS)]) for i in range(n)]


def make_stage(kind: str, config: ModelConfig = TINY_SD1, seed: int = 0, **kw: float) -> Stage:
    torch.manual_seed(seed)
    if kind == "unet":
        return UNetStage(LatentDiffusion(config), config, **kw)
    if kind == "vae":
        return VAEStage(config)
    clip = CLIPConfig(config.text, ImageTowerConfig(image_size=SIZE, patch_size=8, width=32, heads=2), 16)
    return CLIPStage(config, clip)


def quick(**kw: object) -> TrainConfig:
    base: dict[str, object] = dict(steps=3, batch_size=4, warmup=2, lr=1e-3, ema_decay=0.9, progress=False)
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def ctx_for(rows: slice, total: int, step: int = 0) -> StepContext:
    return StepContext(0, step, rows, total, 1, 1, torch.device("cpu"), lambda x: x)


# --- closed forms and reference parity ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2_V], ids=["eps", "v"])
def test_training_target_matches_diffusers(config: ModelConfig) -> None:
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ac = alphas_cumprod(config.schedule)[t].reshape(-1, 1, 1, 1)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    target = training_target(x0, noise, alpha, sigma, config.schedule.prediction)
    expected = ref.get_velocity(x0, noise, t) if config.schedule.prediction == "v" else noise
    torch.testing.assert_close(target, expected, atol=1e-6, rtol=0)
    # The sampler's denoiser inverts it: a model that outputs the target recovers (x0, noise).
    x = alpha * x0 + sigma * noise
    x0_hat, eps_hat = Denoiser(lambda x, t: x, config.schedule.prediction).split(target, x, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(eps_hat, noise, atol=2e-5, rtol=0)


def test_warmup_is_linear_then_constant() -> None:
    cfg = TrainConfig(lr=1e-4, warmup=10_000)
    assert lr_at(cfg, 0) == pytest.approx(1e-8)
    assert lr_at(cfg, 4_999) == pytest.approx(5e-5)
    assert lr_at(cfg, 9_999) == lr_at(cfg, 50_000) == pytest.approx(1e-4)
    assert lr_at(TrainConfig(lr=3e-4, warmup=0), 0) == 3e-4


def test_ema_follows_its_recurrence() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.5)
    shadow = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        net.weight.data.fill_(value)
        ema.update(net)
        d = min(0.5, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * value
        assert ema.shadow["weight"].item() == pytest.approx(shadow)
    assert ema.weights(net)["weight"].item() == pytest.approx(shadow)


def test_contrastive_loss_closed_form() -> None:
    b, s = 5, 3.0
    feats = torch.eye(b, 8)  # orthonormal: each image matches its caption with cosine 1, the others with 0
    loss = contrastive_loss(feats * 2, feats, torch.tensor(math.log(s)))
    assert loss.item() == pytest.approx(-math.log(math.exp(s) / (math.exp(s) + b - 1)), rel=1e-6)
    # The learned scale is clipped at 100.
    big = contrastive_loss(feats, feats, torch.tensor(10.0))
    assert big.item() == pytest.approx(-math.log(math.exp(100) / (math.exp(100) + b - 1)), abs=1e-6)


# --- the stages ----------------------------------------------------------------------------------------------


def test_caption_dropout_empties_captions() -> None:
    images = torch.stack([x for x, _ in toy_data(4)])
    ctx = ctx_for(slice(0, 4), 4)
    always = make_stage("unet", caption_dropout=1.0)
    with torch.no_grad():
        with_text, _ = always.loss((images, CAPTIONS), ctx)
        empty, _ = always.loss((images, [""] * 4), ctx)
        never, _ = make_stage("unet", caption_dropout=0.0).loss((images, CAPTIONS), ctx)
    assert with_text.item() == empty.item()
    assert never.item() != with_text.item()


def test_a_step_splits_into_micro_batches_without_changing_it() -> None:
    """Random numbers are drawn per example of the step, so rows [0, 2) + [2, 4) give the whole batch's loss."""
    stage = make_stage("unet")
    images = torch.stack([x for x, _ in toy_data(4)])
    whole, _ = stage.loss((images, CAPTIONS), ctx_for(slice(0, 4), 4))
    first, _ = stage.loss((images[:2], CAPTIONS[:2]), ctx_for(slice(0, 2), 4))
    second, _ = stage.loss((images[2:], CAPTIONS[2:]), ctx_for(slice(2, 4), 4))
    torch.testing.assert_close(first + second, whole, atol=1e-6, rtol=0)


def compare_runs(a: Trainer, b: Trainer) -> tuple[float, float]:
    """(largest gradient difference relative to the largest gradient, largest weight difference)."""
    ga = {n: p.grad for n, p in a.module.named_parameters()}
    gb = {n: p.grad for n, p in b.module.named_parameters()}
    scale = max(g.abs().max().item() for g in ga.values())
    grad = max((ga[k] - gb[k]).abs().max().item() for k in ga) / scale
    wa, wb = a.module.state_dict(), b.module.state_dict()
    return grad, max((wa[k] - wb[k]).abs().max().item() for k in wa)


# Adam turns a gradient that is zero up to rounding (~1e-9: conv biases feeding a GroupNorm) into a step of
# ±lr, so runs that sum the same gradients in another order compare their weights with a larger ε.
EXACT_ADAM = dict(adam_eps=1e-5)


@pytest.mark.parametrize("kind", ["unet", "vae", "clip"])
def test_gradient_accumulation_equals_the_larger_batch(tmp_path: Path, kind: str) -> None:
    data = toy_data()
    runs = []
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2)):
        trainer = Trainer(
            make_stage(kind), data, quick(batch_size=batch, grad_accum=accum, **EXACT_ADAM), tmp_path / name
        )
        trainer.fit()
        runs.append(trainer)
    grad, weight = compare_runs(*runs)
    if kind == "clip":  # each micro-batch is its own contrastive batch: a different objective
        assert grad > 1e-3
    else:
        assert grad < 1e-5 and weight < 5e-6, (grad, weight)


def test_grad_clip_caps_the_global_gradient_norm(tmp_path: Path) -> None:
    """With ε = lr = 1e6 the first AdamW step is lr·g/(|g| + ε) ≈ g, linear in the gradient, so the step's norm
    is the (clipped) gradient's norm."""
    norms = {}
    for clip in (None, 1e-3):
        stage = make_stage("vae")
        before = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
        cfg = quick(steps=1, warmup=0, lr=1e6, adam_eps=1e6, weight_decay=0.0, grad_clip=clip)
        Trainer(stage, toy_data(4), cfg, tmp_path / str(clip)).fit()
        after = dict(stage.module.named_parameters())
        norms[clip] = math.sqrt(sum(((after[n] - b) ** 2).sum().item() for n, b in before.items()))
    assert norms[None] > 0.05  # the unclipped gradient is far above the cap, so the cap is what binds
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0)


def test_cli_grad_clip_reaches_the_train_config() -> None:
    from stablekit.cli import build_parser
    from stablekit.cli.train import _train_config

    given = build_parser().parse_args(["train", "vae", "--out", "runs/x", "--grad-clip", "0.5"])
    assert _train_config(given).grad_clip == 0.5
    assert _train_config(build_parser().parse_args(["train", "vae", "--out", "runs/x"])).grad_clip is None


def test_training_lowers_the_loss_and_writes_logs(tmp_path: Path) -> None:
    stage = make_stage("vae")
    data = toy_data(8)
    summary = Trainer(stage, data, quick(steps=30, batch_size=8, log_every=5, lr=2e-3, warmup=1), tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert set(rows[0]) == {"step", "loss", "lr", "time"}
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert summary.final_loss == rows[-1]["loss"] and summary.precision == "float32"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_text_tower_loads_into_the_sd_text_encoder(tmp_path: Path) -> None:
    stage = make_stage("clip")
    Trainer(stage, toy_data(8), quick(steps=2), tmp_path / "clip").fit()
    vae = make_stage("vae")
    Trainer(vae, toy_data(8), quick(steps=1), tmp_path / "vae").fit()
    model, config = assemble(
        TINY_SD1, vae=tmp_path / "vae" / "vae.safetensors", text=tmp_path / "clip" / "text.safetensors"
    )
    ids = torch.randint(0, 49407, (2, 77))
    assert isinstance(stage, CLIPStage)
    text = stage.module.text.eval()
    # The export holds the EMA weights: load them into the CLIP model to compare like with like.
    from stablekit.weights import read_state_dict

    clip_state = read_state_dict(tmp_path / "clip" / "clip.safetensors")
    stage.module.load_state_dict(clip_state)
    with torch.no_grad():
        torch.testing.assert_close(model.cond_stage_model(ids), text(ids), atol=0, rtol=0)
    assert config.vae.scale_factor != TINY_SD1.vae.scale_factor  # measured from the trained autoencoder


def test_unet_export_holds_the_ema_weights(tmp_path: Path) -> None:
    stage = make_stage("unet")
    trainer = Trainer(stage, toy_data(), quick(steps=3), tmp_path)
    trainer.fit()
    loaded = load_model(tmp_path / "model.safetensors")
    assert loaded.config == TINY_SD1
    saved = loaded.model.unet.state_dict()
    ema = trainer.ema.weights(stage.module)
    raw = stage.module.state_dict()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    assert all(torch.equal(ckpt["module"][k], raw[k]) for k in raw)  # the raw weights stay in the checkpoint


def test_cli_trains_clip_vae_then_unet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stablekit.cli import main
    from stablekit.config import DEMO
    from stablekit.train.demo_data import write_demo_dataset

    data = str(write_demo_dataset(tmp_path / "data", 4, size=DEMO.default_size))
    common = ["--data", data, "--steps", "1", "--batch-size", "2", "--no-progress", "--seed", "3"]
    assert main(["train", "clip", "--out", str(tmp_path / "clip"), *common]) == 0
    assert main(["train", "vae", "--out", str(tmp_path / "vae"), *common]) == 0
    vae, text = str(tmp_path / "vae" / "vae.safetensors"), str(tmp_path / "clip" / "text.safetensors")
    unet = ["train", "unet", "--out", str(tmp_path / "unet"), "--vae", vae, "--text", text, *common]
    assert main(unet) == 0
    loaded = load_model(tmp_path / "unet" / "model.safetensors")
    assert loaded.config.unet == DEMO.unet and loaded.config.text == DEMO.text
    assert "1 steps (float32)" in capsys.readouterr().out
    # A filter that drops every example is a one-line error, not a traceback.
    assert main([*unet, "--min-size", "1000"]) == 1
    assert "no usable examples" in capsys.readouterr().err


def test_cli_skips_unreadable_samples_and_counts_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A caption that is not UTF-8 and one that is a named pipe cost their samples, not the run (which used to
    abort naming no file, or hang); a manifest that cannot be read is one line naming it, exit status 1."""
    import os

    from stablekit.cli import main
    from stablekit.config import DEMO
    from stablekit.train.demo_data import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", 4, size=DEMO.default_size)
    (data / "000001.txt").write_bytes(b"a caf\xe9 in Latin-1")
    (data / "000002.txt").unlink()
    os.mkfifo(data / "000002.txt")
    common = ["--steps", "1", "--batch-size", "2", "--no-progress"]
    assert main(["train", "vae", "--out", str(tmp_path / "vae"), "--data", str(data), *common]) == 0
    out, err = capsys.readouterr()
    assert "skipped 2 unreadable samples" in out
    assert f"skipping {data / '000001.txt'}: not valid UTF-8" in err
    assert f"skipping {data / '000002.txt'}: not a regular file" in err
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert main(["train", "vae", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "pipe.jsonl"), *common]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "pipe.jsonl") in err and "not a regular file" in err
