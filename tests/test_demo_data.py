"""The demo-data generator: deterministic, captions as a user writes them, every attribute drawn."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from stablekit.train.demo_data import COLORS, SHAPES, Attributes, held_out_prompts, make_example, write_demo_dataset


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", 12, seed=3)
    b = write_demo_dataset(tmp_path / "b", 12, seed=3)
    c = write_demo_dataset(tmp_path / "c", 12, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)
    assert make_example(9)[0].tobytes() == make_example(random.Random(9))[0].tobytes()
    assert len(list(a.glob("*.png"))) == len(list(a.glob("*.txt"))) == 12
    assert (a / "metadata.jsonl").read_text().count("\n") == 12


def test_captions_read_as_a_user_writes_them() -> None:
    rng = random.Random(0)
    captions = [make_example(rng)[1] for _ in range(300)]
    red = Attributes("circle", "red", "blue")
    assert red.caption(say_size=True, say_position=True) == "a red circle on a blue background"
    big = Attributes("triangle", "orange", "black", "large", "top left")
    assert big.caption(say_size=True, say_position=True) == "a large orange triangle on a black background, top left"
    assert big.caption(say_size=False, say_position=False) == "an orange triangle on a black background"
    assert any("," not in c and not c.startswith(("a small", "a large")) for c in captions)  # short prompts
    assert any(c.endswith(", top left") for c in captions)
    assert any(c.startswith("a small ") for c in captions) and any(c.startswith("a large ") for c in captions)
    assert any(c.startswith("an orange ") for c in captions)
    assert not any(" a orange" in f" {c}" or " a orange" in c for c in captions)


def test_every_attribute_is_drawn_and_colours_differ() -> None:
    rng = random.Random(1)
    seen_colors, seen_bgs, seen_shapes = set(), set(), set()
    for _ in range(400):
        image, _, attrs = make_example(rng)
        assert image.size == (64, 64)
        assert attrs.color != attrs.background
        seen_colors.add(attrs.color)
        seen_bgs.add(attrs.background)
        seen_shapes.add(attrs.shape)
    assert seen_colors == seen_bgs == set(COLORS)
    assert seen_shapes == set(SHAPES)


def test_held_out_prompts_come_from_another_stream() -> None:
    held = held_out_prompts(200)
    rng = random.Random(0)
    train = [make_example(rng)[1] for _ in range(200)]
    assert [p for p, _ in held] != train
    assert all(isinstance(a, Attributes) for _, a in held)
