"""Issue 10's command-line failures, each reproduced here first: Ctrl-C while starting, bad devices, a planted
link at the temporary PNG name, a failed rename, and NaN/inf/out-of-range numbers refused before sampling."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import stablekit.cli as cli
from stablekit.cli import main
from stablekit.images import read_parameters, save_png
from stablekit.pipelines import GenerationParams, Pipeline, collect, txt2img


@pytest.fixture(scope="module")
def model(tiny_model_file: Path) -> Path:
    return tiny_model_file


def _one_line_error(capsys: pytest.CaptureFixture[str], message: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err


def test_ctrl_c_while_starting_is_a_clean_interruption(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["generate", "x"]) == 130
    assert capsys.readouterr().err.strip() == "stablekit: interrupted"


@pytest.mark.parametrize(("device", "message"), [("bogus", "unknown device"), ("cuda:99", "cuda:99")])
def test_bad_device_is_one_line(model: Path, tmp_path: Path, capsys, device: str, message: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(model), "--device", device, "-o", str(out)]) == 1
    _one_line_error(capsys, message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA: the refusal cannot happen here")
def test_cuda_without_cuda_is_one_line(model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", "x", "--model", str(model), "--device", "cuda", "-o", str(tmp_path / "o.png")]) == 1
    _one_line_error(capsys, "no CUDA")


def test_a_planted_link_at_the_old_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o.png"
    os.symlink(victim, tmp_path / ".o.png.partial")  # where the temporary file used to be written
    save_png(Image.new("RGB", (8, 8)), out, "x")
    assert victim.read_text() == "precious"
    assert read_parameters(out) == "x"
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_a_failed_rename_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "dir.png"
    out.mkdir()  # a folder where the PNG should go: the rename fails
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (8, 8)), out, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png"]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance", "nan"], "guidance scale must be a number in [0, 100]"),
        (["--guidance", "inf"], "guidance scale"),
        (["--guidance", "1e308"], "guidance scale"),
        (["--sampler", "ddim", "--eta", "nan"], "finite"),
        (["--sampler", "ddim", "--eta", "-1"], "eta must be >= 0"),
    ],
)
def test_bad_numbers_are_refused_before_sampling(
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    unet = Pipeline.unet

    def counting(self: Pipeline, *a: object, **k: object) -> torch.Tensor:
        calls.append(1)
        return unet(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Pipeline, "unet", counting)
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(model), "--steps", "2", *args, "-o", str(out)]) == 1
    _one_line_error(capsys, message)
    assert calls == [] and not out.exists()


def test_nan_message_does_not_suggest_fp32_to_an_fp32_run(model: Path) -> None:
    from stablekit.pipelines import NonFiniteError
    from stablekit.weights import load_model

    loaded = load_model(model)
    with torch.no_grad():
        loaded.model.model.diffusion_model.out[2].bias.fill_(float("nan"))
    pipe = Pipeline(loaded.model, loaded.config, device="cpu", dtype=torch.float32)
    params = GenerationParams("x", width=32, height=32, steps=2, seed=1, sampler="ddim")
    with pytest.raises(NonFiniteError) as caught:
        collect(txt2img(pipe, params))
    assert "NaN" in str(caught.value) and "fp32" not in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "100000", "--height", "100000"], "--max-pixels"),
        (["--batch-size", "1000000"], "--max-batch-pixels"),
        (["--batch-count", "5000"], "--max-images"),
        (["--steps", "5000"], "--max-steps"),
        (["--negative", "y" * 30_000], "--max-prompt-chars"),
    ],
)
def test_limits_are_checked_before_sampling(
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    monkeypatch.setattr(Pipeline, "unet", lambda *a, **k: calls.append(1))
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(model), *args, "-o", str(out)]) == 1
    _one_line_error(capsys, message)
    assert calls == [] and not out.exists()


def test_a_limit_flag_raises_its_limit(model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    base = ["generate", "x", "--model", str(model), "-W", "64", "-H", "64", "--steps", "2", "-o", str(out)]
    assert main([*base, "--max-pixels", "1000"]) == 1
    _one_line_error(capsys, "(4,096) is over the limit of 1,000")
    assert main([*base, "--max-pixels", "4096"]) == 0


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr("stablekit.cli.convert.load_model", fail)


@pytest.mark.parametrize(
    ("dst", "message"),
    [("/proc/stablekit-test.safetensors", "cannot write /proc/"), ("missing/out.safetensors", "does not exist")],
)
def test_convert_to_an_unwritable_destination_fails_before_loading(  # type: ignore[no-untyped-def]
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, dst: str, message: str
) -> None:
    # Issue 10, item 4: a raw SafetensorError traceback, and only after the whole model had loaded.
    _no_model_load(monkeypatch)
    target = dst if dst.startswith("/") else str(tmp_path / dst)
    assert main(["convert", str(model), target]) == 1
    _one_line_error(capsys, message)


def test_convert_onto_a_full_disk_leaves_nothing(model: Path, tmp_path: Path) -> None:
    # A file-size limit is a full disk as the writer sees it (EFBIG instead of ENOSPC), without needing one.
    code = (
        "import resource, signal, sys; from stablekit.cli import main\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    for dst, extra in ((out / "m.safetensors", []), (out / "folder", ["--to", "diffusers"])):
        run = subprocess.run(
            [sys.executable, "-c", code, "convert", str(model), str(dst), *extra], capture_output=True, text=True
        )
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert "error: cannot write" in run.stderr and "File too large" in run.stderr, run.stderr
        assert list(out.iterdir()) == []


def test_an_interrupted_diffusers_conversion_leaves_no_folder(  # type: ignore[no-untyped-def]
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 10, item 5: interrupted, it left model_index.json and a 0-byte tokenizer/vocab.json that loaded.
    dst = tmp_path / "folder"
    seen: list[bool] = []

    def interrupted(folder: str, _text: object) -> None:
        seen.append(dst.exists())  # the tokenizer is written last: by now every other file is in place
        raise KeyboardInterrupt

    monkeypatch.setattr("stablekit.weights.diffusers.write_tokenizer", interrupted)
    assert main(["convert", str(model), str(dst), "--to", "diffusers"]) == 130
    assert seen == [False] and not dst.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["convert", str(model), str(dst), "--to", "diffusers"]) == 0
    capsys.readouterr()
    # Replacing an existing folder keeps it whole too: the old one stays until the new one is complete.
    monkeypatch.setattr("stablekit.weights.diffusers.write_tokenizer", interrupted)
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    assert main(["convert", str(model), str(dst), "--to", "diffusers", "--overwrite"]) == 130
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def _rewritten(model: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """``model`` written again by the safetensors library after ``edit`` (its metadata kept)."""
    with safe_open(str(model), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(state)
    save_file(state, str(dst), metadata=meta)
    return dst


def _header_edited(model: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    raw = model.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return dst


def _first_two(header: dict[str, Any]) -> tuple[str, str]:
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    return a, b


def _overlap(header: dict[str, Any]) -> None:
    a, b = _first_two(header)
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]  # b now reads a's bytes; the file's length is unchanged


def test_info_refuses_what_generate_refuses(model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # Also noticed in issue 10: info exited 0 on overlapping offsets, duplicate names and wrong shapes.
    def wrong_shape(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.endswith("out.2.bias"))
        state[key] = torch.zeros(state[key].numel() + 1)

    overlapping = _header_edited(model, tmp_path / "overlap.safetensors", _overlap)
    raw = model.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    a = _first_two(json.loads(raw[8 : 8 + n]))[0]
    entry = json.dumps(json.loads(raw[8 : 8 + n])[a])
    # JSON allows a name twice; json.loads would keep the second silently.
    text = raw[8 : 8 + n].decode().replace("{", "{" + json.dumps(a) + ": " + entry + ", ", 1).encode()
    duplicate = tmp_path / "duplicate.safetensors"
    duplicate.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    cases = [
        (overlapping, "overlap"),
        (duplicate, "twice"),
        (_rewritten(model, tmp_path / "shape.safetensors", wrong_shape), "out.2.bias: file has"),
    ]
    for path, message in cases:
        assert main(["info", str(path)]) == 1, path
        _one_line_error(capsys, message)
        out = tmp_path / "o.png"
        args = ["generate", "x", "--model", str(path), "-W", "64", "-H", "64", "--steps", "1", "-o", str(out)]
        assert main(args) == 1
        _one_line_error(capsys, message)


def test_a_named_pipe_as_model_is_refused_not_waited_on(tmp_path: Path) -> None:
    # Also noticed in issue 10: opening a FIFO blocks until a writer comes, so `info fifo` hung forever.
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "model_index.json")
    for path in (fifo, folder):
        run = subprocess.run(
            [sys.executable, "-m", "stablekit", "info", str(path)], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1 and "not a regular file" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("output", ["/proc/stablekit-test.png", "/dev/null/x.png"])
def test_an_unwritable_output_fails_before_sampling(  # type: ignore[no-untyped-def]
    model: Path, capsys, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    # Also noticed in issue 10: the output path was checked only after sampling.
    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr("stablekit.cli.options.Pipeline.from_file", fail)
    assert main(["generate", "x", "--model", str(model), "-o", output]) == 1
    _one_line_error(capsys, "cannot ")


@pytest.mark.parametrize(("prompt", "message"), [("a\x00b", "NUL character at position 1"), ("a\ud800", "surrogate")])
def test_prompts_that_are_not_text_are_refused_before_sampling(  # type: ignore[no-untyped-def]
    model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, prompt: str, message: str
) -> None:
    # An unpaired surrogate failed only after sampling, when the PNG text chunk was written.
    out = tmp_path / "o.png"
    for flag in ([], ["--negative", prompt]):
        args = ["generate", "x" if flag else prompt, *flag, "--model", str(model), "-W", "64", "-H", "64"]
        assert main([*args, "--steps", "1", "-o", str(out)]) == 1
        _one_line_error(capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_holding_nan_is_refused_naming_the_tensor(  # type: ignore[no-untyped-def]
    model: Path, tmp_path: Path, capsys, value: float
) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        key = next(k for k in state if k.endswith("out.2.bias"))
        state[key] = state[key].clone()
        state[key][0] = value

    path = _rewritten(model, tmp_path / "poisoned.safetensors", poison)
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(path), "-W", "64", "-H", "64", "--steps", "1", "-o", str(out)]) == 1
    _one_line_error(capsys, "out.2.bias holds 1 NaN or infinite value(s)")


def test_community_extras_are_reported_and_never_loaded(model: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # What merges and old training tools leave in a file: reported by info, set aside by the loader.
    def extras(state: dict[str, torch.Tensor]) -> None:
        state["embedding_manager.embedder.transformer.x"] = torch.ones(3)
        state["lora_unet_down_blocks_0.alpha"] = torch.ones(1)

    merged = _rewritten(model, tmp_path / "merged.safetensors", extras)
    assert main(["info", str(merged)]) == 0
    out = capsys.readouterr().out
    assert "2 key(s): not part of a Stable Diffusion network" in out and "embedding_manager" in out
    images = []
    for path in (model, merged):
        out_png = tmp_path / f"{path.stem}.png"
        args = ["generate", "x", "--model", str(path), "-W", "64", "-H", "64", "--steps", "2", "--seed", "1"]
        assert main([*args, "-o", str(out_png)]) == 0
        images.append(np.asarray(Image.open(out_png)))
    assert np.array_equal(images[0], images[1])
    # A key under a network's prefix that fits nothing is still an error, never skipped.
    stray = _rewritten(
        model, tmp_path / "stray.safetensors", lambda s: s.__setitem__("model.diffusion_model.zz", torch.ones(1))
    )
    assert main(["info", str(stray)]) == 1
    _one_line_error(capsys, "model.diffusion_model.zz")


@pytest.fixture(scope="module")
def folder(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("folder") / "pipe"
    assert main(["convert", str(model), str(out), "--to", "diffusers"]) == 0
    return out


@pytest.mark.parametrize(
    ("file", "edit"),
    [
        ("scheduler/scheduler_config.json", {"beta_start": [1]}),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": 1e300}),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": -5}),
        ("unet/config.json", {"layers_per_block": 2.5}),
        ("unet/config.json", {"cross_attention_dim": None}),
        ("unet/config.json", {"norm_num_groups": 33}),
        ("text_encoder/config.json", {"num_hidden_layers": -1}),
        ("text_encoder/config.json", {"hidden_size": None}),
    ],
)
def test_malformed_folder_configs_are_one_line_errors(  # type: ignore[no-untyped-def]
    folder: Path, tmp_path: Path, capsys, file: str, edit: dict[str, object]
) -> None:
    # Fuzzing found TypeErrors escaping, and a model built from whatever sizes a config names.
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    path = bad / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    assert main(["info", str(bad)]) == 1
    _one_line_error(capsys, str(bad))


def test_serve_on_a_taken_port_fails_before_loading(capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # uvicorn reported it only after the model had loaded, with its own exit status 3.
    def fail(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before the port was bound")

    monkeypatch.setattr("stablekit.cli.serve.load_pipeline", fail)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 1
    _one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}")
    assert main(["serve", "--host", "no-such-host.invalid", "--port", "7999"]) == 1
    _one_line_error(capsys, "cannot listen on no-such-host.invalid")
