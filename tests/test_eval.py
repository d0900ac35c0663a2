"""``stablekit eval``: prompts from text and COCO files, the guidance list, bad input, and a whole small sweep on
the demo model that resumes with the same images and refuses to mix settings."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from stablekit.cli import main
from stablekit.cli.eval import parse_guidance
from stablekit.eval.prompts import PromptsError, read_prompts

# The form of COCO 2017's captions_val2017.json, typed in: its first annotations (image 179765 and others).
COCO = {
    "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
    "licenses": [],
    "images": [{"id": 179765, "file_name": "000000179765.jpg", "height": 480, "width": 640}],
    "annotations": [
        {"image_id": 179765, "id": 38, "caption": "A black Honda motorcycle parked in front of a garage."},
        {"image_id": 179765, "id": 182, "caption": "A Honda motorcycle parked in a grass driveway"},
        {"image_id": 190236, "id": 401, "caption": "An office cubicle with four different types of computers."},
        {"image_id": 331352, "id": 441, "caption": "A small closed toilet in a cramped space."},
        {"image_id": 517069, "id": 447, "caption": "Two women waiting at a bench next to a street.\n"},
        {"image_id": 182417, "id": 449, "caption": "A beautiful dessert  waiting to be shared by two people"},
    ],
}


def _one_line_error(capsys: pytest.CaptureFixture[str], message: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], err


def test_guidance_list() -> None:
    assert parse_guidance("8,1.5, 3,3") == [1.5, 3.0, 8.0]
    for bad, message in [
        ("nan", "outside"),
        ("inf", "outside"),
        ("0", "outside"),
        ("-2", "outside"),
        ("101", "outside"),
        ("two", "not a number"),
        ("3,,4", "not a number"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_guidance(bad)


def test_coco_captions_are_sampled_reproducibly(tmp_path: Path) -> None:
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(COCO), encoding="utf-8")
    everything = read_prompts(path, 100, seed=0)
    assert everything[0] == "A black Honda motorcycle parked in front of a garage."
    assert everything[4] == "Two women waiting at a bench next to a street."  # stray newline gone
    assert everything[5] == "A beautiful dessert waiting to be shared by two people"  # double space gone
    sample = read_prompts(path, 3, seed=0)
    assert len(sample) == 3 and len(set(sample)) == 3 and set(sample) <= set(everything)
    assert read_prompts(path, 3, seed=0) == sample
    assert any(read_prompts(path, 3, seed=s) != sample for s in range(1, 6))


def test_text_prompts_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    assert read_prompts(path, 10, seed=0) == ["a red circle", "a blue square"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"\xff\xfe bad", "p.txt", "not UTF-8"),
        (b"{not json", "p.json", "not valid JSON"),
        (b'{"images": []}', "p.json", "no 'annotations' list"),
        (b'{"annotations": [{"id": 1}]}', "p.json", "annotation 0 has no 'caption'"),
        (b"\n \n", "p.txt", "holds no prompts"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptsError, match=message):
        read_prompts(path, 5, seed=0)


def test_a_fifo_or_folder_is_refused_without_waiting(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(PromptsError, match="not a regular file"):
            read_prompts(path, 5, seed=0)
    with pytest.raises(PromptsError, match="does not exist"):
        read_prompts(tmp_path / "absent.txt", 5, seed=0)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance", "nan"], "--guidance"),
        (["--n", "1"], "--n must be at least 2"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--size", "60"], "--size must be a positive multiple of 8"),
        (["--model", "m.safetensors"], "--prompts is required"),
        (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["--fid-weights", "/nonexistent/pt_inception.pth"], "/nonexistent/pt_inception.pth"),
        (["--n", "2000000"], "--n must be at most 1,000,000"),
        (["--real", "/nonexistent/val2017"], "not a folder of images"),
        (["--sampler", "bogus"], "unknown sampler 'bogus'"),
        (["--size", "4096"], "over the limit"),
    ],
)
def test_bad_options_fail_before_sampling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    out = tmp_path / "sweep"
    assert main(["eval", "--out", str(out), "-q", *flags]) == 1
    _one_line_error(capsys, message)
    assert not out.exists()  # no sweep folder is started with settings that cannot run


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "results.csv"
    file.write_text("keep me\n", encoding="utf-8")
    assert main(["eval", "--out", str(file), "-q"]) == 1
    _one_line_error(capsys, "is a file")
    assert file.read_text(encoding="utf-8") == "keep me\n"


def _results(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_small_demo_sweep_scores_resumes_and_refuses_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = ["eval", "--out", str(out), "--n", "4", "--guidance", "6,2", "--steps", "2", "--batch-size", "2", "-q"]
    assert main(args) == 0
    rows = _results(out)
    assert [float(r["guidance"]) for r in rows] == [2.0, 6.0]
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0
        assert 0 <= float(r["clip_score"]) <= 100 and int(r["images"]) == 4
    about = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert about["steps"] == 2 and about["sampler"] == "ddim" and about["real_images"] == 4
    with Image.open(out / "fid-vs-clip.png") as plot:
        assert plot.format == "PNG"
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 8
    before = {p: p.read_bytes() for p in images}
    stamps = {p: p.stat().st_mtime_ns for p in images}
    capsys.readouterr()

    # An interrupted sweep: one image of the second batch at guidance 6 is missing. Its batch is sampled again
    # whole, so the image is the one the uninterrupted run made, and no other file is rewritten.
    lost = out / "images" / "guidance-6" / "000003.png"
    lost.unlink()
    assert main(args) == 0
    assert "7 of 8 images are from an earlier run" in capsys.readouterr().err
    assert lost.read_bytes() == before[lost]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in images if p != lost)
    assert _results(out) == rows  # the scores are those of the same images

    assert main([*args[:-1], "--steps", "3", "-q"]) == 1
    _one_line_error(capsys, "other settings (steps)")
