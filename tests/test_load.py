"""Safe checkpoint reading: every container format round-trips, and bad or hostile files fail cleanly."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from stablekit.weights.load import CheckpointError, read_checkpoint, read_shapes, read_state_dict, write_safetensors


def _state() -> OrderedDict[str, torch.Tensor]:
    base = torch.randn(6, 4)
    return OrderedDict(
        w=torch.randn(3, 5).half(),
        b=torch.randn(7).bfloat16(),
        ids=torch.arange(9)[None],
        flag=torch.tensor([True, False]),
        strided=base[1::2, ::2],  # a non-contiguous view with a storage offset
        tied=base,  # shares its storage with ``strided``
        param=torch.nn.Parameter(torch.ones(2, 2)),
        scalar=torch.tensor(0.5),
    )


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k], t.detach()), k


def _fake_module(monkeypatch: pytest.MonkeyPatch, dotted: str) -> types.ModuleType:
    """Register ``dotted`` (and its parents) so pickle can *save* a class from it; the loader never sees it."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[dotted]


class ModelCheckpoint:
    """Stands for the pytorch_lightning callback pickled into sd-v1-4.ckpt."""

    def __init__(self) -> None:
        self.monitor = "val/loss"
        self.best_k_models = {"epoch=1.ckpt": torch.tensor(0.1)}


def _lightning_checkpoint(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    mod = _fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint")
    monkeypatch.setattr(ModelCheckpoint, "__module__", mod.__name__)
    mod.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    return {"state_dict": _state(), "global_step": 470000, "epoch": 6, "callbacks": {"cb": ModelCheckpoint()}}


def test_torch_zip_with_lightning_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = _lightning_checkpoint(monkeypatch)
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    monkeypatch.undo()  # the callback's module is gone again, as on a machine without lightning
    ckpt = read_checkpoint(path)
    assert ckpt.format == "torch-zip" and ckpt.global_step == 470000
    assert ckpt.tensors is not None
    _assert_same(ckpt.tensors, obj["state_dict"])  # type: ignore[arg-type]
    assert any("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in n for n in ckpt.notes)
    with pytest.raises(ModuleNotFoundError):  # torch's own full unpickler needs the class
        torch.load(path, weights_only=False)


def test_legacy_torch_format(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    state = _state()
    torch.save({"state_dict": state, "global_step": 12}, path, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(path)
    assert ckpt.format == "torch-legacy" and ckpt.global_step == 12
    assert ckpt.tensors is not None
    _assert_same(ckpt.tensors, state)


def test_dtypes_without_a_storage_class(tmp_path: Path) -> None:
    # torch pickles these through an untyped byte storage plus ``_rebuild_tensor_v3(..., dtype)``.
    state = {"f8": torch.randn(4).to(torch.float8_e4m3fn), "u16": torch.tensor([1, 2, 65535]).to(torch.uint16)}
    torch.save(state, tmp_path / "odd.pt")
    got = read_state_dict(tmp_path / "odd.pt")
    for k, t in state.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k].view(torch.uint8), t.view(torch.uint8))


def test_bare_state_dict_and_suffix_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"  # a torch zip despite its name
    state = _state()
    torch.save(state, path)
    _assert_same(read_state_dict(path), state)


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.ckpt"  # safetensors despite its name
    state = _state()
    write_safetensors(path, state, {"stablekit.config": "{}"})
    ckpt = read_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.metadata["stablekit.config"] == "{}"
    assert ckpt.tensors is not None
    _assert_same(ckpt.tensors, state)
    assert read_shapes(path) == {k: tuple(t.shape) for k, t in state.items()}


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_that_would_run_code_is_inert(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    state = {"w": torch.ones(2)}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hook": _RunsCode(marker)}, path, _use_new_zipfile_serialization=not legacy)
    ckpt = read_checkpoint(path)
    assert not marker.exists()
    assert ckpt.tensors is not None
    _assert_same(ckpt.tensors, state)
    assert any(".system" in n for n in ckpt.notes)


def test_pickle_whose_payload_is_the_code_errors(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(_RunsCode(marker), path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(path)
    assert not marker.exists()


def test_builtins_eval_is_not_resolved(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    # GLOBAL builtins.eval, then REDUCE with (payload,): what a hand-made hostile pickle looks like.
    data = b"\x80\x02}q\x00X\x01\x00\x00\x00xcbuiltins\neval\nX" + struct.pack("<I", len(payload))
    data += payload.encode() + b"\x85R" + b"s."
    path = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    assert pickle.loads(data) is not None and marker.exists()  # the payload is live under plain pickle
    marker.unlink()
    ckpt = read_checkpoint(path)
    assert not marker.exists() and ckpt.tensors == {}
    assert any("builtins.eval" in n for n in ckpt.notes)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
        (b"hello, this is a text file\n", "not a safetensors"),
        (bytes(range(256)) * 4, "not a safetensors"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (struct.pack("<Q", 2**60) + b'{"a": 1}', "header claims"),
        (struct.pack("<Q", 10) + b"{not json}", "not valid JSON"),
        (struct.pack("<Q", 26) + b'{"__metadata__": {"a": 1}}', "must map strings to strings"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = _write(tmp_path / "bad.safetensors", content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


def _safetensors_with(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "truncated"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}, "bad data_offsets"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "do not hold"),
        ({"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ],
)
def test_bad_safetensors_entries(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    path = _write(tmp_path / "bad.safetensors", _safetensors_with({"t": entry}, bytes(8)))
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_truncated_files(tmp_path: Path) -> None:
    state = {"w": torch.randn(64, 64)}
    good = tmp_path / "good.safetensors"
    write_safetensors(good, state)
    cut = _write(tmp_path / "cut.safetensors", good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(cut)
    # Only the shapes are read from the header, so they survive; the data read does not.
    torch.save(state, tmp_path / "good.ckpt")
    raw = (tmp_path / "good.ckpt").read_bytes()
    for n in (len(raw) // 2, len(raw) - 30, 40):
        with pytest.raises(CheckpointError, match="cannot read torch zip checkpoint"):
            read_checkpoint(_write(tmp_path / "cut.ckpt", raw[:n]))


def test_storage_member_shorter_than_its_tensor(tmp_path: Path) -> None:
    src = tmp_path / "good.ckpt"
    torch.save({"w": torch.randn(16)}, src)
    bad = tmp_path / "bad.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    with pytest.raises(CheckpointError, match="needs 64 bytes"):
        read_checkpoint(bad)


def _rezip_deflated(src: Path, dst: Path, grow: dict[str, int] | None = None) -> None:
    """Copy a torch zip with every member deflated; ``grow`` appends that many zero bytes to a member, streamed,
    so a test can make a small file that inflates to hundreds of MB without holding them."""
    grow = grow or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            with zout.open(info.filename, "w", force_zip64=True) as out:
                out.write(zin.read(info))
                for _ in range(grow.get(info.filename.rpartition("/")[2], 0) // 2**20):
                    out.write(bytes(2**20))


def _peak_rss_growth_mb(path: Path) -> float:
    """Load ``path`` in a fresh interpreter; how far its peak RSS rose during the read, in MB."""
    code = (
        "import resource, sys; from stablekit.weights.load import read_checkpoint, CheckpointError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try: read_checkpoint(sys.argv[1])\n"
        "except CheckpointError as e: print(e, file=sys.stderr)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def test_deflated_member_is_inflated_no_further_than_its_tensor(tmp_path: Path) -> None:
    # Issue 10, item 1: the storage member inflates to 256 MB, the pickle declares 64 bytes for it.
    src = tmp_path / "small.ckpt"
    torch.save({"w": torch.arange(16, dtype=torch.float32)}, src)
    bomb = tmp_path / "bomb.ckpt"
    _rezip_deflated(src, bomb, {"0": 256 * 2**20})
    assert bomb.stat().st_size < 2 * 2**20
    assert _peak_rss_growth_mb(bomb) < 64
    assert torch.equal(read_checkpoint(bomb).tensors["w"], torch.arange(16, dtype=torch.float32))  # type: ignore[index]


def test_declared_inflation_past_the_ratio_is_refused_before_inflating(tmp_path: Path) -> None:
    src = tmp_path / "zeros.ckpt"
    torch.save({"w": torch.zeros(2**25)}, src)  # 128 MiB of zeros: deflates about 1000:1
    packed = tmp_path / "packed.ckpt"
    _rezip_deflated(src, packed)
    src.unlink()
    with pytest.raises(CheckpointError, match="zip bomb"):
        read_checkpoint(packed)
    assert _peak_rss_growth_mb(packed) < 64


def test_deflated_checkpoint_within_the_ratio_loads(tmp_path: Path) -> None:
    state = {"w": torch.randn(256, 64), "b": torch.zeros(64)}
    src = tmp_path / "plain.ckpt"
    torch.save(state, src)
    packed = tmp_path / "packed.ckpt"
    _rezip_deflated(src, packed)
    got = read_checkpoint(packed).tensors
    assert got is not None and all(torch.equal(got[k], v) for k, v in state.items())


def test_a_pickle_memo_index_cannot_size_the_memo(tmp_path: Path) -> None:
    # Fuzzing found it: "}" then LONG_BINPUT 0x04000000 (9 bytes) made CPython's unpickler allocate a 1 GB memo,
    # and 0x7fffffff would ask for 32 GB. A pickler numbers memo entries from 0, so such an index is refused.
    pkl = b"\x80\x02}r" + struct.pack("<I", 0x04000000) + b"."
    path = tmp_path / "memo.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
    with pytest.raises(CheckpointError, match="memo index"):
        read_checkpoint(path)
    assert _peak_rss_growth_mb(path) < 64
    legacy = Path(__file__).parent / "data" / "fuzz" / "legacy-pickle-memo-index-1gb.pt"
    with pytest.raises(CheckpointError, match="memo index"):
        read_checkpoint(legacy)
    assert _peak_rss_growth_mb(legacy) < 64


def test_a_declared_length_past_the_end_is_not_allocated() -> None:
    # A BINUNICODE declaring 3 GB: a file object's read(n) allocates n before finding the file shorter.
    path = Path(__file__).parent / "data" / "fuzz" / "legacy-declared-3gb-string.pt"
    with pytest.raises(CheckpointError, match="malformed pickle"):
        read_checkpoint(path)
    assert _peak_rss_growth_mb(path) < 64
