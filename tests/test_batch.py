"""``stablekit batch``: one PNG per row, Azure's predictions.csv, resumable after SIGKILL with bit-identical images,
sharded over two torchrun processes with the single process's outputs, bad rows reported, and the Azure ML
batch scoring script on a folder of CSV files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.cli import main
from stablekit.images import read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # its subprocesses run on one thread too (see conftest)

ROOT = Path(__file__).resolve().parent.parent
HEADER = "prompt,negative_prompt,seed,steps,guidance_scale,width,height,sampler"
# Two setting groups (steps 3 and 4) interleaved, rows with and without seeds, one named sampler.
ROWS = [
    "a red circle,,5,3,7.5,64,64,",
    "a blue square,a red circle,,3,7.5,64,64,",
    "a green triangle,,11,4,7.5,64,64,",
    "a yellow circle,,,3,7.5,64,64,",
    '"a red, large square",,12,3,7.5,64,64,',
    "a blue circle,,,4,7.5,64,64,",
    "a small square,,13,3,5,64,64,euler",
]
PREDICTION_COLUMNS = ["row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name"]


def _csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _batch(model: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["batch", str(source), "--out", str(out), "--model", str(model), "-q", *extra])


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _predictions(out: Path) -> list[list[str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.reader(f))


def _same_outputs(a: Path, b: Path) -> None:
    pngs = sorted(p.name for p in a.glob("*.png"))
    assert pngs == sorted(p.name for p in b.glob("*.png"))
    for name in pngs:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    assert (a / "manifest.jsonl").read_bytes() == (b / "manifest.jsonl").read_bytes()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tiny_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The input and one uninterrupted single-process run over it, batch size 2."""
    where = tmp_path_factory.mktemp("reference")
    source = _csv(where / "prompts.csv", ROWS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses it is compared with (module-scoped: before `one_thread` applies)
    try:
        assert _batch(tiny_model_file, source, where / "out", "--batch-size", "2", "--seed", "100") == 0
    finally:
        torch.set_num_threads(before)
    return source, where / "out"


def test_uninterrupted_run_writes_every_output_and_matches_generate(
    tiny_model_file: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = reference
    names = [f"prompts-{i}.png" for i in range(len(ROWS))]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    table = _predictions(out)
    assert table[0] == PREDICTION_COLUMNS
    assert [r[0] for r in table[1:]] == [str(i) for i in range(len(ROWS))]
    assert [r[2] for r in table[1:]] == names and all(r[4] == "prompts.csv" and r[3] == "" for r in table[1:])
    assert table[5][1] == "a red, large square"
    manifest = _manifest(out)
    assert [m["row"] for m in manifest] == list(range(len(ROWS)))
    assert all(m["error"] is None for m in manifest)
    assert [manifest[i]["seed"] for i in (0, 2, 4, 6)] == [5, 11, 12, 13]
    assert len({m["seed"] for m in manifest}) == len(ROWS)  # rows without a seed got distinct ones
    assert manifest[1]["negative_prompt"] == "a red circle" and manifest[6]["sampler"] == "euler"
    assert manifest[6]["guidance_scale"] == 5.0 and manifest[2]["steps"] == 4 and manifest[0]["width"] == 64
    # Each image is the one `stablekit generate` makes with the row's seed and settings, infotext included:
    # bit for bit when rows run one at a time; in a UNet batch of 2, within one level (a batched matmul sums in
    # another order on a CPU), which is why a resumed or sharded job keeps the uninterrupted job's batches.
    alone = tmp_path / "alone"
    assert _batch(tiny_model_file, reference[0], alone, "--batch-size", "1", "--seed", "100") == 0
    assert _manifest(alone) == manifest
    for i in (1, 2, 6):
        m = manifest[i]
        args = ["generate", m["prompt"], "--model", str(tiny_model_file), "--seed", str(m["seed"])]
        args += ["--steps", str(m["steps"]), "--guidance", str(m["guidance_scale"]), "-W", "64", "-H", "64"]
        args += ["-n", m["negative_prompt"], "-o", str(tmp_path / f"{i}.png")]
        if i == 6:
            args += ["--sampler", "euler"]
        assert main(args) == 0
        want = _pixels(tmp_path / f"{i}.png")
        assert np.array_equal(want, _pixels(alone / m["generated_image"]))
        assert np.abs(want.astype(int) - _pixels(out / m["generated_image"])).max() <= 1
        assert read_parameters(tmp_path / f"{i}.png") == read_parameters(out / m["generated_image"])
    # Run again: nothing is computed and nothing changes.
    again = tmp_path / "again"
    again.mkdir()
    for p in out.iterdir():
        (again / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in again.glob("*.png")}
    assert _batch(tiny_model_file, reference[0], again, "--batch-size", "2", "--seed", "100") == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in again.glob("*.png")}
    _same_outputs(out, again)


def test_sigkill_then_rerun_gives_the_uninterrupted_outputs(tiny_model_file: Path, tmp_path: Path) -> None:
    rows = [
        f"a {c} {s},,,3,7.5,64,64," for c in ("red", "green", "blue", "white", "black") for s in ("circle", "square")
    ]
    source = _csv(tmp_path / "jobs.csv", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stablekit", "batch", str(source), "--out", str(out), "--model", str(tiny_model_file)]
    cmd += ["--batch-size", "2", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    done = len(list(out.glob("*.png")))
    assert 2 <= done < len(rows) and not (out / "predictions.csv").exists()
    # Make it worse: a manifest line cut short, and a finished image lost.
    with open(out / "manifest-rank0.jsonl", "a") as f:
        f.write('{"row": 7, "input_csv_na')
    (out / "jobs-0.png").unlink()
    assert _batch(tiny_model_file, source, out, "--batch-size", "2") == 0
    assert _batch(tiny_model_file, source, tmp_path / "whole", "--batch-size", "2") == 0
    _same_outputs(out, tmp_path / "whole")
    table = _predictions(out)[1:]
    assert [r[2] for r in table] == [f"jobs-{i}.png" for i in range(len(rows))]
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_two_torchrun_processes_give_the_single_process_outputs(
    tiny_model_file: Path, reference: tuple[Path, Path], tmp_path: Path
) -> None:
    source, single = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stablekit"]
    cmd += ["batch", str(source), "--out", str(tmp_path), "--model", str(tiny_model_file), "-q"]
    done = subprocess.run(
        [*cmd, "--batch-size", "2", "--seed", "100"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _same_outputs(single, tmp_path)
    # Each process generated its own share: both manifests hold rows, none twice.
    shares = [
        [json.loads(x)["row"] for x in (tmp_path / f"manifest-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(len(ROWS)))


BAD_ROWS = [
    "a red circle,,1,2,7.5,64,64,",  # fine
    ",,2,2,7.5,64,64,",  # empty prompt
    "a red circle,,x,2,7.5,64,64,",  # not a number
    f"a red circle,,{'9' * 5000},2,7.5,64,64,",  # a huge number
    "a red circle,,4,2,nan,64,64,",  # NaN
    "a red circle,,5,2,7.5,8192,8192,",  # over the pixel limit
    "a red circle,,6,5000,7.5,64,64,",  # over the step limit
    "a red circle,,7,2,7.5,64,64,no-such-sampler",
    "a blue square,,8,2,7.5,64,64,",  # fine
]


def test_bad_rows_are_reported_and_the_error_threshold_holds(
    tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _csv(tmp_path / "bad.csv", BAD_ROWS)
    assert _batch(tiny_model_file, source, tmp_path / "all") == 0
    manifest = _manifest(tmp_path / "all")
    errors = [m["error"] for m in manifest]
    assert errors[0] is None and errors[-1] is None and all(errors[1:-1])
    assert "empty prompt" in errors[1] and "integer" in errors[2] and "integer" in errors[3]
    assert "guidance" in errors[4] and "--max-pixels" in errors[5] and "--max-steps" in errors[6]
    assert [r[2] for r in _predictions(tmp_path / "all")[1:]] == ["bad-0.png", "bad-8.png"]
    assert sorted(p.name for p in (tmp_path / "all").glob("*.png")) == ["bad-0.png", "bad-8.png"]
    # Seven failures: a threshold of 7 lets the job finish, 6 stops it before any image is made.
    assert _batch(tiny_model_file, source, tmp_path / "seven", "--error-threshold", "7") == 0
    capsys.readouterr()
    assert _batch(tiny_model_file, source, tmp_path / "six", "--error-threshold", "6") == 1
    err = capsys.readouterr().err.strip()
    assert "7 rows failed" in err and len(err.splitlines()) == 1
    assert not list((tmp_path / "six").glob("*.png"))


def test_hostile_inputs_are_one_line_errors(
    tiny_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(source: Path, out: Path, message: str, *extra: str) -> None:
        capsys.readouterr()
        assert _batch(tiny_model_file, source, out, *extra) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err

    folder = tmp_path / "folder"
    folder.mkdir()
    _csv(folder / "a.csv", ["a red circle,,1,2,7.5,64,64,"])
    (folder / "notes.txt").write_text("hello")
    refused(folder, tmp_path / "o1", "only .csv files")
    (folder / "notes.txt").unlink()
    os.mkfifo(folder / "b.csv")  # would block a plain open()
    refused(folder, tmp_path / "o2", "not a regular file")
    (folder / "b.csv").unlink()
    refused(_csv(tmp_path / "noprompt.csv", ["x,1"], header="text,seed"), tmp_path / "o3", "no 'prompt' column")
    (tmp_path / "nul.csv").write_bytes(b"prompt,seed\na red\x00circle,1\n")
    assert _batch(tiny_model_file, tmp_path / "nul.csv", tmp_path / "o4") == 0
    assert "NUL" in _manifest(tmp_path / "o4")[0]["error"]
    refused(folder, tmp_path / "o5", "more than 0 rows", "--max-rows", "0")
    (tmp_path / "huge.jsonl").write_text('{"prompt": "a red circle", "seed": ' + "9" * 5000 + "}\n")
    refused(tmp_path / "huge.jsonl", tmp_path / "o7", "line 1 is not JSON")
    # An output folder that cannot be made fails before the model loads (this "model" would fail to load).
    blocker = tmp_path / "file"
    blocker.write_text("")
    capsys.readouterr()
    assert main(["batch", str(folder), "--out", str(blocker / "out"), "--model", str(tmp_path / "missing")]) == 1
    assert "output folder" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("prompt\nx\n")
    refused(tmp_path / "x.txt", tmp_path / "o6", "give a .csv, .jsonl or .parquet file")


def test_jsonl_and_parquet_inputs_give_the_csv_images(tiny_model_file: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "a red circle", "seed": 3, "steps": 2, "width": 64, "height": 64},
        {"prompt": "a blue square", "steps": 2, "width": 64, "height": 64, "seed": None},
    ]
    for name in ("in.csv", "in.jsonl", "in.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
    _csv(
        tmp_path / "in.csv",
        ["a red circle,3,2,64,64", "a blue square,,2,64,64"],
        header="prompt,seed,steps,width,height",
    )
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    for name in ("in.csv", "in.jsonl", "in.parquet"):
        assert _batch(tiny_model_file, tmp_path / name, tmp_path / name.replace(".", "_")) == 0
    for name in ("in_jsonl", "in_parquet"):
        # Row 1 has no seed: its seed follows the file's name, so only row 0 is the same image in every form.
        assert (tmp_path / "in_csv" / "in-0.png").read_bytes() == (tmp_path / name / "in-0.png").read_bytes()
        assert [m["error"] for m in _manifest(tmp_path / name)] == [None, None]


def test_azureml_batch_script_scores_a_folder_of_csv_files(
    tiny_model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stablekit.batch import azureml

    folder = tmp_path / "inputs"
    folder.mkdir()
    a = _csv(folder / "a.csv", ["a red circle,,,2,7.5,64,64,", "a blue square,,4,2,7.5,64,64,"])
    b = _csv(folder / "b.csv", [",,,2,7.5,64,64,"])
    broken = _csv(folder / "c.csv", ["x"], header="text")
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(tiny_model_file.parent))
    monkeypatch.setenv("AZUREML_BI_OUTPUT_PATH", str(tmp_path / "azure"))
    azureml.init()
    results = [json.loads(r) for r in azureml.run([str(a), str(b), str(broken)])]
    assert [r["input_csv_name"] for r in results] == ["a.csv", "b.csv", "c.csv"]
    assert [(r["images"], r["failed"]) for r in results[:2]] == [(2, 0), (0, 1)]
    assert results[2]["error"] and "prompt" in results[2]["error"]
    # The same images as `stablekit batch` over the files (seeds follow file name and row, not the split).
    broken.unlink()
    assert _batch(tiny_model_file, folder, tmp_path / "cli") == 0
    for i in (0, 1):
        assert (tmp_path / "azure" / "a" / f"a-{i}.png").read_bytes() == (tmp_path / "cli" / f"a-{i}.png").read_bytes()
    assert [r[2] for r in _predictions(tmp_path / "azure" / "a")[1:]] == ["a-0.png", "a-1.png"]
