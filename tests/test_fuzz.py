"""The file loaders under a short fuzz run, and one regression test per crash the long runs found (issue 10).

The long runs are atheris (``python -m fuzz.run``, figures in fuzz/RESULTS.md). Here hypothesis drives the same
targets (:mod:`fuzz.targets`) for a few seconds: seeds written by the real libraries (:mod:`fuzz.corpus`), edited by
the targets' own structure-aware mutators, and raw bytes. A target records anything but a clean refusal (one of our
error classes, with a message) as a finding; each example runs under an address-space cap and a CPU-time watchdog,
so that a memory or time blow-up is a finding rather than a stalled suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import corpus, targets
from stablekit.images import ImageError, load_image
from stablekit.weights.load import CheckpointError, read_checkpoint

DATA = Path(__file__).parent / "data" / "fuzz"

_FAST = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@contextlib.contextmanager
def _memory_cap(extra: int = 2 * 2**30) -> Iterator[None]:
    """Address space of the process now plus ``extra`` (a 9-byte pickle can make CPython's unpickler zero
    32 GB); the previous limit is put back."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(autouse=True)
def _fresh_findings() -> Iterator[None]:
    targets.configure(keep_going=True, timeout_s=10.0)
    targets.findings.counts.clear()
    targets.findings.examples.clear()
    yield
    targets.configure()


def _run(target: Callable[[bytes], None], data: bytes) -> None:
    targets.findings.counts.clear()  # this input's findings only, or hypothesis would shrink to an innocent one
    targets.findings.examples.clear()
    with _memory_cap():
        target(data)
    # Soft findings and peak-RSS marks are the long runs' to report; the cap above already bounds memory here.
    hard = [k for k in targets.findings.counts if " soft: " not in k and " memory: " not in k]
    assert not hard, f"{hard[0]}\ninput: {targets.findings.examples[hard[0]][:400]!r}"


@pytest.fixture(scope="session")
def named_seeds() -> dict[str, dict[str, bytes]]:
    return {
        "safetensors": corpus.safetensors_seeds(),
        "zip": corpus.zip_seeds(),
        "legacy": corpus.legacy_seeds(),
        "image": corpus.image_seeds(),
    }


@pytest.fixture(scope="session")
def seeds(named_seeds: dict[str, dict[str, bytes]]) -> dict[str, list[bytes]]:
    return {name: list(pool.values()) for name, pool in named_seeds.items()}


@pytest.fixture(scope="session")
def folder_seeds(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("fuzz-folders")
    folders = {kind: corpus.write_diffusers_folder(root / kind, kind) for kind in ("sd1", "x4")}
    targets.use_folders(folders)
    return list(corpus.diffusers_seeds(folders).values())


def _inputs(name: str, pool: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed after one to three rounds of the target's mutator, or raw bytes."""

    def mutated(args: tuple[int, list[int]]) -> bytes:
        index, rounds = args
        data = pool[index]
        for seed in rounds:
            data = targets.mutate(name, data, seed, max_size=1 << 15)
        return data

    rounds = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=3)
    return st.one_of(
        st.tuples(st.integers(0, len(pool) - 1), rounds).map(mutated),
        st.binary(max_size=256),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pickletools on the escapes of a fuzzed string
@pytest.mark.parametrize(("name", "examples"), [("safetensors", 300), ("zip", 200), ("legacy", 200), ("image", 150)])
def test_file_targets_refuse_cleanly(seeds: dict[str, list[bytes]], name: str, examples: int) -> None:
    @settings(_FAST, max_examples=examples)
    @given(data=_inputs(name, seeds[name]))
    def run(data: bytes) -> None:
        _run(targets.TARGETS[name], data)

    run()


def test_diffusers_folder_target_refuses_cleanly(folder_seeds: list[bytes]) -> None:
    @settings(_FAST, max_examples=60)
    @given(data=_inputs("diffusers", folder_seeds))
    def run(data: bytes) -> None:
        _run(targets.diffusers_folder, data)

    run()


def test_the_seeds_themselves_are_read(named_seeds: dict[str, dict[str, bytes]]) -> None:
    # Otherwise the mutations above would start from files the readers refuse anyway. A pickled module or list
    # is no state dict: refused on purpose.
    for name, pool in named_seeds.items():
        for seed, data in pool.items():
            targets.findings.inputs.clear()
            targets.TARGETS[name](data)
            want = "refused" if seed in ("module", "not_a_dict") else "read"
            assert targets.findings.inputs[f"{name} {want}"] == 1, (name, seed)
    assert not targets.findings.counts


# --- regression tests: one per crash found -------------------------------------------------------------------------


def _safetensors_file(tmp_path: Path, header: str, data: bytes = b"") -> Path:
    raw = header.encode()
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_safetensors_dtype_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    # Found: TypeError (unhashable type: 'list') from the dtype lookup.
    path = _safetensors_file(tmp_path, '{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    with pytest.raises(CheckpointError, match=r"fuzzed\.safetensors.*unsupported dtype \['F32'\]"):
        read_checkpoint(path)


def test_a_safetensors_header_with_an_overlong_integer_is_refused(tmp_path: Path) -> None:
    # Found: json's own ValueError (over 4300 digits) escaped as a bare ValueError.
    big = "1" + "0" * 5000
    path = _safetensors_file(tmp_path, f'{{"w": {{"dtype": "F32", "shape": [{big}], "data_offsets": [0, 4]}}}}')
    with pytest.raises(CheckpointError, match=r"fuzzed\.safetensors: safetensors header cannot be read") as got:
        read_checkpoint(path, shapes_only=True)
    assert "\n" not in str(got.value)


def test_a_deeply_nested_safetensors_header_is_refused(tmp_path: Path) -> None:
    # Found: json's RecursionError escaped.
    path = _safetensors_file(tmp_path, '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=r"fuzzed\.safetensors: safetensors header is nested too deeply"):
        read_checkpoint(path, shapes_only=True)


def _torch_zip(tmp_path: Path, pickled: bytes) -> Path:
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    path = tmp_path / "fuzzed.ckpt"
    with zipfile.ZipFile(path, "w") as dst:
        for name, content in members.items():
            dst.writestr(name, pickled if name.endswith("/data.pkl") else content)
    return path


def test_a_torch_error_quoting_a_line_of_the_file_stays_one_line(tmp_path: Path) -> None:
    # Found: "could not convert string to float: 'loatStorage\n'" made a two-line CheckpointError.
    path = _torch_zip(tmp_path, b"Fnot a float\n.")
    with pytest.raises(CheckpointError, match=r"fuzzed\.ckpt: cannot read torch zip checkpoint: .*not a float") as got:
        read_checkpoint(path)
    assert "\n" not in str(got.value)


def test_a_pickled_class_name_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    # The same through our own message: the placeholder's repr quotes the module and name the pickle gives.
    stream = b"\x80\x04\x8c\x01a\x94\x8c\x04b\nc\n\x94\x93)\x81."  # STACK_GLOBAL "a" "b\nc\n", NEWOBJ
    path = _torch_zip(tmp_path, stream)
    with pytest.raises(CheckpointError, match=r"the pickle holds <not loaded: a\.b\\nc\\n>, not a state dict") as got:
        read_checkpoint(path)
    assert "\n" not in str(got.value)


def test_an_image_declaring_more_data_than_memory_allows_is_refused() -> None:
    # Found: a 140-byte PNG whose IDAT length makes PIL allocate ~2 GB before reading; under a memory limit the
    # MemoryError escaped load_image. Without a limit the same file is refused as corrupt.
    path = DATA / "png-huge-idat-length.png"
    with _memory_cap(extra=2**30), pytest.raises(ImageError, match="declares more data than there is memory"):
        load_image(path)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_a_jpeg_whose_exif_value_has_the_wrong_type_is_refused() -> None:
    # Found: struct.error from PIL re-packing the EXIF block in exif_transpose (a value of the wrong type for its
    # tag) escaped load_image.
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(DATA / "jpeg-exif-value-of-wrong-type.jpg")


def test_mutators_keep_their_formats() -> None:
    # The structure-aware mutators must hand back what the readers parse, or the fuzzer degenerates to bytes.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    st_file = struct.pack("<Q", len(header)) + header + bytes(4)
    parsed = 0
    for seed in range(50):
        out = targets.mutate("safetensors", st_file, seed)
        (n,) = struct.unpack("<Q", out[:8])
        with contextlib.suppress(ValueError, RecursionError):
            json.loads(out[8 : 8 + n])
            parsed += 1
    assert parsed >= 15
    png = corpus.image_seeds()["png_RGB"]
    assert targets.fix_png_crcs(png[:40] + b"\x00" + png[41:]) != png[:40] + b"\x00" + png[41:]
    assert targets.fix_png_crcs(png) == png


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("diffusers-*.bin")))
def test_each_diffusers_finding_is_refused_cleanly(folder_seeds: list[bytes], name: str) -> None:
    # The long runs' folder findings (tests/data/fuzz/README.md): a TypeError, RecursionError, OverflowError,
    # AssertionError or a bare ValueError escaping, or a model of 2**63 layers; each is now a one-line refusal.
    _run(targets.diffusers_folder, (DATA / name).read_bytes())


@pytest.mark.parametrize(
    "name",
    [
        "safetensors-config-norm-groups-33.safetensors",
        "safetensors-config-100k-res-blocks.safetensors",
        "zip-pickle-memo-index-1gb.ckpt",
        "legacy-pickle-memo-index-1gb.pt",
        "legacy-declared-3gb-string.pt",
    ],
)
def test_each_checkpoint_finding_is_refused_or_read_cleanly(name: str) -> None:
    # A stored config with 33 norm groups or 100,000 res blocks is ignored for the shapes (a note); the memo and
    # declared-length pickles are refused without the allocation (tests/test_load.py measures the memory).
    target = {".safetensors": "safetensors", ".ckpt": "zip", ".pt": "legacy"}[Path(name).suffix]
    _run(targets.TARGETS[target], (DATA / name).read_bytes())
