"""LoRA files against diffusers' own loading, on identical tiny random weights.

The LoRA is made by the reference libraries: PEFT adapters added with diffusers' ``UNet2DConditionModel.add_adapter``
and transformers' ``CLIPTextModel.add_adapter`` (with an ``alpha_pattern`` and a ``rank_pattern``, and on 1x1 and
3x3 convolutions too), every factor randomised (PEFT starts B at zero: a no-op), saved with diffusers'
``StableDiffusionPipeline.save_lora_weights`` and the adapters' configs as metadata, as diffusers' training scripts
save them. diffusers loads it (``load_lora_weights`` + ``fuse_lora(lora_scale=...)``) into the pipeline it saved with
``save_pretrained``; we load that folder, read the LoRA and merge it; UNet and text-encoder outputs must agree.

The same factors renamed by hand to kohya's documented names (``lora_unet_`` / ``lora_te_`` + the diffusers module
path with ``_`` for ``.``; ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) must merge to the same weights bit
for bit, and diffusers reading a kohya file must agree with us too (one with a single alpha: diffusers' kohya
conversion drops per-module alphas, with a warning). SD2 covers the OpenCLIP text tower, whose fused
``in_proj_weight`` takes the q/k/v updates in row blocks. (transformers 5's PEFT state dict names the text encoder's
modules without ``text_model.``, so the diffusers-format file exercises that spelling too.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Generated, GenerationParams, Pipeline, collect, txt2img
from stablekit.pipelines.networks import add_lora
from stablekit.prompts.lora import LoraMerge
from stablekit.weights import load_model
from stablekit.weights.lora import LoraError, lora_from_state_dict, read_lora
from tests.oracles import hf_clip_tokenizer, require
from tests.test_tasks_parity import _perturb, _text_encoder, _unet, _vae

diffusers = require("diffusers")
peft = require("peft")
training_utils = require("diffusers.training_utils")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
RANK, ALPHA = 4, 8
SCALE = 0.7  # the weight the LoRA is merged with (diffusers' lora_scale)


@dataclass
class Case:
    folder: Path  # the base pipeline, written by diffusers
    peft_file: Path  # diffusers' save_lora_weights
    kohya_file: Path  # the same factors under kohya's names
    kohya_uniform_file: Path  # the same, every alpha ALPHA (diffusers' kohya path ignores per-module alphas)
    state: dict[str, Tensor]  # the diffusers-format LoRA state dict


def _kohya(state: dict[str, Tensor], *, uniform: bool = False) -> dict[str, Tensor]:
    """kohya's names for a diffusers/PEFT LoRA state dict, from kohya's documented naming: ``lora_unet_`` / ``lora_te_``
    + the module's path in ``UNet2DConditionModel`` / ``CLIPTextModel`` (which starts ``text_model.``) with ``_`` for
    ``.``. Alpha as the LoraConfigs below set it (``alpha_pattern`` {"to_k": 2}, else ``ALPHA``), or ``ALPHA``
    everywhere with ``uniform``."""
    out: dict[str, Tensor] = {}
    parts = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
    for key, tensor in state.items():
        suffix = next(s for s in parts if key.endswith(s))
        component, _, module = key[: -len(suffix)].partition(".")
        if component == "text_encoder":
            # transformers 5's PEFT state dict leaves out CLIPTextModel's ``text_model.`` level; kohya's names have it.
            module = module if module.startswith("text_model.") else f"text_model.{module}"
        name = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        out[name + parts[suffix]] = tensor
        alpha = 2.0 if module.endswith(".to_k") and not uniform else float(ALPHA)
        out[name + ".alpha"] = torch.tensor(alpha)
    return out


def base_pipeline(root: Path, sd2: bool, gen: torch.Generator) -> tuple[Any, Path]:
    """A tiny diffusers ``StableDiffusionPipeline`` (SD2: OpenCLIP-style text tower, linear projections) with
    perturbed weights, and the folder its ``save_pretrained`` wrote."""
    extra = {"attention_head_dim": (2, 4), "use_linear_projection": True} if sd2 else {}
    unet, vae, text = _unet(4, **extra), _vae([32, 64]), _text_encoder(openclip=sd2)
    for m in (unet, vae, text):
        _perturb(m, gen)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=hf_clip_tokenizer(root / "tokenizer", pad_token="!" if sd2 else None),
        unet=unet,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "base"
    pipe.save_pretrained(folder)
    return pipe, folder


def _build(root: Path, sd2: bool) -> Case:
    gen = torch.Generator().manual_seed(1234)
    pipe, folder = base_pipeline(root, sd2, gen)
    unet, text = pipe.unet, pipe.text_encoder
    unet.add_adapter(
        peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS, alpha_pattern={"to_k": 2}, rank_pattern={"to_v": 2}
        )
    )
    text.add_adapter(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TEXT_TARGETS))
    with torch.no_grad():
        for m in (unet, text):
            for name, p in m.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    layers = {
        "unet_lora_layers": peft.utils.get_peft_model_state_dict(unet),
        "text_encoder_lora_layers": peft.utils.get_peft_model_state_dict(text),
    }
    assert all(layers.values())
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root,
        **layers,
        **training_utils._collate_lora_metadata({"unet": unet, "text_encoder": text}),
        weight_name="lora.safetensors",
    )
    state = {f"unet.{k}": v for k, v in layers["unet_lora_layers"].items()}
    state |= {f"text_encoder.{k}": v for k, v in layers["text_encoder_lora_layers"].items()}
    save_file({k: v.contiguous() for k, v in _kohya(state).items()}, root / "kohya.safetensors")
    save_file({k: v.contiguous() for k, v in _kohya(state, uniform=True).items()}, root / "kohya-uniform.safetensors")
    files = [root / name for name in ("lora.safetensors", "kohya.safetensors", "kohya-uniform.safetensors")]
    return Case(folder, *files, state)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("lora")
    return {kind: _build(root / kind, kind == "sd2") for kind in ("sd1", "sd2")}


def _ours(case: Case) -> LatentDiffusion:
    return load_model(case.folder).model.eval()


def _reference(case: Case, lora: Path | None) -> Any:
    ref = diffusers.StableDiffusionPipeline.from_pretrained(case.folder, local_files_only=True)
    if lora is not None:
        ref.load_lora_weights(lora)
        ref.fuse_lora(lora_scale=SCALE)
    return ref


INPUTS = torch.Generator().manual_seed(7)
X = torch.randn(2, 4, 16, 16, generator=INPUTS)
T = torch.tensor([10, 700])
CONTEXT = torch.randn(2, 77, 32, generator=INPUTS)
IDS = torch.randint(0, 49408, (2, 77), generator=INPUTS)


@torch.no_grad()
def _outputs_ours(model: LatentDiffusion) -> tuple[Tensor, Tensor]:
    return model.unet(X, T, CONTEXT), model.cond_stage_model(IDS)


@torch.no_grad()
def _outputs_ref(ref: Any) -> tuple[Tensor, Tensor]:
    return ref.unet(X, T, encoder_hidden_states=CONTEXT).sample, ref.text_encoder(IDS)[0]


def _diff(got: Tensor, want: Tensor) -> float:
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_merged_lora_matches_diffusers(cases: dict[str, Case], kind: str, fmt: str) -> None:
    """diffusers' own kohya conversion reads kohya's names as we do; it takes one alpha for all modules (it warns that
    the per-module ones "did not match any targeted module"), so its kohya file has one alpha."""
    case = cases[kind]
    file = case.peft_file if fmt == "peft" else case.kohya_uniform_file
    model = _ours(case)
    base = _outputs_ours(model)
    want = _outputs_ref(_reference(case, file))
    with LoraMerge(model, [(read_lora(file, model), SCALE)]):
        got = _outputs_ours(model)
    for g, w, b in zip(got, want, base, strict=True):
        assert _diff(g, w) <= 1e-5, _diff(g, w)
        assert _diff(b, w) > 1e-2  # the LoRA changes both networks' outputs: the comparison can fail
    assert all(torch.equal(a, b) for a, b in zip(_outputs_ours(model), base, strict=True))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_kohya_names_merge_to_the_same_weights(cases: dict[str, Case], kind: str) -> None:
    """The PEFT file and its kohya renaming (alpha_pattern as .alpha keys) merge to identical weights."""
    case = cases[kind]
    model = _ours(case)
    merged = []
    for file in (case.peft_file, case.kohya_file):
        lora = read_lora(file, model)
        assert len(lora.layers) == len(case.state) // 2
        with LoraMerge(model, [(lora, SCALE)]):
            merged.append({k: v.clone() for k, v in model.state_dict().items()})
    assert merged[0].keys() == merged[1].keys()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unmerge_restores_every_weight_bit_for_bit(cases: dict[str, Case], dtype: torch.dtype) -> None:
    case = cases["sd2"]
    model = _ours(case).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_lora(case.kohya_file, model)
    merge = LoraMerge(model, [(lora, 1.0), (lora, -0.3)])
    merge.merge()
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any("in_proj_weight" in k for k in changed) and any("diffusion_model" in k for k in changed)
    merge.unmerge()
    merge.unmerge()  # a second unmerge does nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_merging_twice_is_refused_and_an_exception_still_unmerges(cases: dict[str, Case]) -> None:
    case = cases["sd1"]
    model = _ours(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = read_lora(case.peft_file, model)
    with pytest.raises(RuntimeError, match="inside"), LoraMerge(model, [(lora, 1.0)]) as merge:
        with pytest.raises(LoraError, match="already applied"):
            merge.merge()
        with pytest.raises(LoraError, match="another LoRA merge"):
            LoraMerge(model, [(lora, 0.5)]).merge()
        raise RuntimeError("inside")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_and_misshapen_keys_are_named(cases: dict[str, Case]) -> None:
    case = cases["sd1"]
    model = _ours(case)
    state = _kohya(case.state)
    with pytest.raises(LoraError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        lora_from_state_dict(
            state | {"lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, model
        )
    key = next(k for k in state if k.endswith("attn2_to_k.lora_down.weight"))
    with pytest.raises(LoraError, match=f"{key.split('.')[0]} makes a"):
        lora_from_state_dict(state | {key: torch.zeros(4, 48)}, model)
    with pytest.raises(LoraError, match="SDXL"):
        lora_from_state_dict(
            {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, model
        )
    with pytest.raises(LoraError, match="DoRA"):
        lora_from_state_dict(state | {key.replace("lora_down.weight", "dora_scale"): torch.zeros(1, 32)}, model)
    with pytest.raises(LoraError, match="has no up factor"):
        lora_from_state_dict({key: state[key]}, model)


def _older_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The names diffusers wrote before PEFT: UNet attention processors (``attn1.processor.to_q_lora.down.weight``,
    saved without the ``unet.`` prefix), ``lora.down``/``lora.up`` on other UNet modules, ``lora_linear_layer`` in
    the text encoder."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        module, _, part = key.rpartition(".lora_")
        part = "down.weight" if part == "A.weight" else "up.weight"
        attn, _, proj = module.rpartition(".")
        if module.startswith("unet.") and proj in ("to_q", "to_k", "to_v", "0"):
            attn, proj = (attn.rpartition(".")[0], "to_out") if proj == "0" else (attn, proj)
            out[f"{attn.removeprefix('unet.')}.processor.{proj}_lora.{part}"] = tensor
        elif module.startswith("unet."):
            out[f"{module}.lora.{part}"] = tensor
        else:
            out[f"{module}.lora_linear_layer.{part}"] = tensor
    return out


def test_older_diffusers_names_and_pickles_read_as_the_same_layers(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["sd2"]
    model = _ours(case)
    want = {
        (layer.target, layer.source.removeprefix("unet.")): layer for layer in read_lora(case.peft_file, model).layers
    }
    older = lora_from_state_dict(_older_diffusers(case.state), model)
    assert len(older.layers) == len(want)
    for layer in older.layers:
        w = want[(layer.target, layer.source.removeprefix("unet."))]
        assert torch.equal(layer.down, w.down) and torch.equal(layer.up, w.up)
        assert layer.scale == 1.0  # no alpha and no metadata: alpha = rank, as diffusers reads them
    # A kohya file pickled with torch.save reads through the safe unpickler.
    torch.save(_kohya(case.state), tmp_path / "kohya.pt")

    def summary(path: Path) -> list[tuple[str, tuple[int, int] | None, float]]:
        return sorted((x.target.key, x.target.rows, x.scale) for x in read_lora(path, model).layers)

    assert summary(tmp_path / "kohya.pt") == summary(case.kohya_file)


def test_a_lora_read_for_another_model_is_refused_before_any_change(cases: dict[str, Case]) -> None:
    sd1, sd2 = _ours(cases["sd1"]), _ours(cases["sd2"])
    before = {k: v.clone() for k, v in sd2.state_dict().items()}
    with pytest.raises(LoraError, match="update of"):
        LoraMerge(sd2, [(read_lora(cases["sd1"].peft_file, sd1), 1.0)]).merge()
    assert all(torch.equal(before[k], v) for k, v in sd2.state_dict().items())


# --- on a pipeline: <lora:NAME:W> tags, --lora, and the weights afterwards ----------------------------------


def _params(prompt: str, seed: int = 1) -> GenerationParams:
    return GenerationParams(prompt, width=64, height=64, steps=3, guidance_scale=5.0, seed=seed, sampler="ddim")


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_a_prompt_tag_draws_diffusers_fused_lora_image(cases: dict[str, Case], kind: str, tmp_path: Path) -> None:
    case = cases[kind]
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(case.peft_file, folder / "styles" / "Inked.safetensors")  # found in a subfolder, any case
    pipe = Pipeline.from_file(case.folder, device="cpu", dtype=torch.float32)
    pipe.lora_dir = folder
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    events = list(txt2img(pipe, _params(f"a cat <lora:inked:{SCALE}>")))
    ours = np.asarray(collect(iter(events))[0], dtype=np.int16)
    ref = _reference(case, case.peft_file)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, clip_sample=False)
    want = ref(
        "a cat ",
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(1)],
        output_type="np",
    ).images[0]
    assert np.abs(ours - np.round(want * 255).astype(np.int16)).max() <= 2
    # The run's merge is gone afterwards, bit for bit, and the PNG text keeps the prompt as written.
    assert all(torch.equal(before[k], v) for k, v in pipe.model.state_dict().items())
    assert next(e for e in events if isinstance(e, Generated)).parameters[0].startswith(f"a cat <lora:inked:{SCALE}>")
    plain = np.asarray(collect(txt2img(pipe, _params("a cat ")))[0], dtype=np.int16)
    assert np.abs(plain - ours).max() > 2  # the LoRA did something
    add_lora(pipe, case.kohya_file, SCALE)  # --lora FILE:0.7: the same factors under kohya's names, every run
    assert np.abs(np.asarray(collect(txt2img(pipe, _params("a cat ")))[0], dtype=np.int16) - ours).max() <= 1


def test_lora_tags_are_checked_before_any_compute(cases: dict[str, Case], tmp_path: Path) -> None:
    pipe = Pipeline.from_file(cases["sd1"].folder, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"need a LoRA folder \(--lora-dir\)"):
        list(txt2img(pipe, _params("a cat <lora:inked>")))
    pipe.lora_dir = tmp_path
    for prompt, message in [
        ("a cat <lora:inked>", "LoRA 'inked' not found"),
        ("a cat <lora:inked:lots>", "the weight must be a number"),
        ("a cat <lora:../up>", "without folders"),
        ("a cat <hypernet:inked>", "only <lora:NAME>"),
    ]:
        with pytest.raises(ValueError, match=message):
            list(txt2img(pipe, _params(prompt)))
    shutil.copy(cases["sd1"].peft_file, tmp_path / "inked.safetensors")
    mixed = replace(_params("a"), prompt=["a <lora:inked>", "b"])
    with pytest.raises(ValueError, match="LoRA tags differ between the prompts of one run"):
        list(txt2img(pipe, mixed))

    class Compiled:  # stands in for the OpenVINO engine, whose networks cannot take a merge
        name = "openvino"

    pipe.engine = Compiled()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="use --engine torch"):
        list(txt2img(pipe, _params("a cat <lora:inked>")))


def test_cli_lora_options(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["sd1"]
    common = ["-m", str(case.folder), "-W", "64", "-H", "64", "--steps", "2", "--seed", "3", "--sampler", "ddim"]
    run = [sys.executable, "-c", "import sys; from stablekit.cli import main; sys.exit(main())", "generate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    by_option = subprocess.run(
        [*run, "a cat", *common, "--lora", f"{case.kohya_file}:{SCALE}", "-o", str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
        env=env,
    )
    by_tag = subprocess.run(
        [
            *run,
            f"a cat <lora:kohya:{SCALE}>",
            *common,
            "--lora-dir",
            str(case.kohya_file.parent),
            "-o",
            str(tmp_path / "b.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert by_option.returncode == 0 and by_tag.returncode == 0, by_option.stderr + by_tag.stderr
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("a.png", "b.png"))
    assert np.abs(a - b).max() <= 1
    bad = subprocess.run(
        [*run, "a cat", *common, "--lora", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1 and "none.safetensors" in bad.stderr and "Traceback" not in bad.stderr
