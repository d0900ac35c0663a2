"""The adherence checker, with the demo-data generator as its independent oracle."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from PIL import Image

from stablekit.train.adherence import evaluate, parse_prompt, score
from stablekit.train.demo_data import Attributes, make_example, render


def test_scores_generator_truth_perfectly() -> None:
    rng = random.Random(11)
    examples = [make_example(rng) for _ in range(300)]
    table = evaluate([im for im, _, _ in examples], [cap for _, cap, _ in examples])
    assert table == {k: 1.0 for k in table}


def test_parse_round_trips_captions() -> None:
    rng = random.Random(2)
    for _ in range(200):
        _, caption, attrs = make_example(rng)
        assert parse_prompt(caption) == attrs
    assert parse_prompt("A Red circle on a blue background.") == Attributes("circle", "red", "blue")


@pytest.mark.parametrize("bad", ["a cat on a mat", "a red dodecahedron on a blue background", "a red circle"])
def test_unparseable_prompts_are_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_prompt(bad)


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        (dict(color="green"), "color"),
        (dict(background="white"), "background"),
        (dict(shape="triangle"), "shape"),
        (dict(position="top left"), "position"),
        (dict(size="small"), "size"),
    ],
)
def test_wrong_images_fail_the_right_attribute(change: dict, attribute: str) -> None:
    asked = Attributes("circle", "red", "blue", "large", "bottom right")
    wrong = render(replace(asked, **change))
    result = score(wrong, asked)
    assert not result[attribute]
    assert all(v for k, v in result.items() if k != attribute)


def test_blank_image_fails_everything_but_background() -> None:
    blank = Image.new("RGB", (64, 64), (35, 70, 215))
    result = score(blank, "a red circle on a blue background")
    assert result["background"] and not result["color"] and not result["shape"]


def test_stray_specks_do_not_move_the_shape() -> None:
    asked = Attributes("triangle", "yellow", "purple", "small", "bottom left")
    image = render(asked)
    image.paste((245, 245, 245), (58, 2, 61, 5))  # a 3x3 white speck, top right
    assert all(score(image, asked).values())
