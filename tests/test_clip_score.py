"""CLIP score against transformers' ``CLIPModel`` (random weights, a tiny config typed in by hand, saved with its
own ``save_pretrained``), preprocessed by its ``CLIPImageProcessorPil`` and tokenized by its ``CLIPTokenizer``;
the score is torchmetrics' definition, 100 * max(cos, 0), over transformers' embeddings. The demo CLIP is
checked for behaviour only: the matching caption of a demo image outscores a wrong one."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stablekit.eval.clip_score import ClipScorer, load_clip_scorer
from stablekit.weights.load import CheckpointError
from tests.oracles import hf_clip_tokenizer, require

PROMPTS = ["a red circle on a blue background", "a photo of a cat", "x " * 100]
SIZE = 30  # the vision tower's input side


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is projected; 4 returned the tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any, Path]:
    """(transformers CLIPModel, its tokenizer, its image processor, the folder they were saved to)."""
    transformers = require("transformers")
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": SIZE,
            "patch_size": 2,
            "hidden_act": "quick_gelu",
        },
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        resample=3,  # bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor.save_pretrained(folder)
    tokenizer = hf_clip_tokenizer(folder)  # vocab.json + merges.txt in the model folder, as the Hub's release has
    return model, tokenizer, processor, folder


@pytest.fixture(scope="module")
def scorer(reference: tuple[Any, Any, Any, Path]) -> ClipScorer:
    return load_clip_scorer(reference[3])


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def test_embeddings_match_transformers(reference: tuple[Any, Any, Any, Path], scorer: ClipScorer) -> None:
    model, tokenizer, processor, _ = reference
    pixels = torch.randn(3, 3, SIZE, SIZE)
    ids = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref_image = _features(model.get_image_features(pixel_values=pixels))
        ref_text = _features(model.get_text_features(**ids))
        ours_image = scorer.model.encode_image(pixels)
        ours_text = scorer.text_embeds(PROMPTS)
    torch.testing.assert_close(ours_image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_text, ref_text, atol=1e-5, rtol=0)


def test_folder_without_tokenizer_uses_the_openai_vocabulary(
    reference: tuple[Any, Any, Any, Path], tmp_path: Path
) -> None:
    model, tokenizer, _, folder = reference
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    ids = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref_text = _features(model.get_text_features(**ids))
    torch.testing.assert_close(load_clip_scorer(tmp_path).text_embeds(PROMPTS), ref_text, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(37, 52), (64, 41)])
def test_score_matches_transformers(reference: tuple[Any, Any, Any, Path], scorer: ClipScorer, h: int, w: int) -> None:
    model, tokenizer, processor, _ = reference
    images = _images(3, h, w, seed=h * w)
    pixels = processor(images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
    ids = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = _features(model.get_image_features(pixel_values=pixels))
        text = _features(model.get_text_features(**ids))
    expected = 100 * F.cosine_similarity(image, text, dim=-1).clamp(min=0)  # torchmetrics' CLIPScore, per image
    assert (expected > 0).any() and (expected == 0).any()  # both sides of the clamp are exercised
    torch.testing.assert_close(scorer.image_embeds(images), image, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer.score(images, PROMPTS), expected, atol=1e-4, rtol=0)


def test_long_prompt_is_cut_and_reported(scorer: ClipScorer) -> None:
    cut = scorer.truncated(PROMPTS)
    assert cut[0] is None and cut[1] is None
    assert cut[2] is not None and cut[2].startswith("x")


def test_bad_inputs(scorer: ClipScorer) -> None:
    images = _images(2, 32, 32, seed=1)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, ["a"])
    with pytest.raises(ValueError, match="no prompts"):
        scorer.score(images[:0], [])
    with pytest.raises(ValueError, match="list of strings"):
        scorer.score(images[:1], "a")
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(images.float(), ["a", "b"])
    with pytest.raises(ValueError, match="no prompts"):
        scorer.text_embeds([])


def test_bad_folders(reference: tuple[Any, Any, Any, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip_scorer(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_clip_scorer(reference[3] / "model.safetensors")
    (tmp_path / "config.json").write_text('{"text_config": {}, "vision_config": {}}')
    with pytest.raises(CheckpointError, match="no weights file"):
        load_clip_scorer(tmp_path)
    # A safety checker's folder is a CLIPConfig too, but holds no text tower.
    (tmp_path / "config.json").write_text((reference[3] / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(reference[3] / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("text_")}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_clip_scorer(tmp_path)


def test_bad_demo_files(tmp_path: Path) -> None:
    from stablekit.demo import MODEL
    from stablekit.weights.clip_score import load_demo_clip

    with pytest.raises(CheckpointError, match="missing"):
        load_demo_clip(image_from=tmp_path / "clip-image.safetensors")
    with pytest.raises(CheckpointError, match="no image tower config"):
        load_demo_clip(image_from=MODEL)  # the text-to-image model, not an image tower


def test_demo_clip_prefers_the_matching_caption() -> None:
    """On demo shapes, the caption that describes the image scores above the one with the colours swapped."""
    from stablekit.train.demo_data import COLORS, SHAPES, Attributes, render

    rng = random.Random(7)
    images, right, wrong = [], [], []
    for _ in range(32):
        color, background = rng.sample(sorted(COLORS), 2)
        attrs = Attributes(rng.choice(SHAPES), color, background)
        images.append(torch.from_numpy(np.array(render(attrs))).permute(2, 0, 1))
        right.append(attrs.caption(say_size=False, say_position=False))
        swapped = Attributes(attrs.shape, background, color)
        wrong.append(swapped.caption(say_size=False, say_position=False))
    scorer = load_clip_scorer(None)
    batch = torch.stack(images)
    better = (scorer.score(batch, right) > scorer.score(batch, wrong)).float().mean().item()
    assert better >= 0.8


@pytest.mark.parametrize(("h", "w"), [(64, 64), (96, 130), (200, 71)])
def test_demo_preprocessing_is_what_the_demo_clip_trained_on(h: int, w: int) -> None:
    """The demo CLIP learned from :func:`resize_crop` + :func:`from_pil`; the scorer must feed it the same."""
    from PIL import Image

    from stablekit.eval.clip_score import SquarePreprocess
    from stablekit.images import from_pil
    from stablekit.train.data import resize_crop

    image = Image.fromarray(np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    torch.testing.assert_close(SquarePreprocess(64)([image]), from_pil(resize_crop(image, 64)), atol=0, rtol=0)
