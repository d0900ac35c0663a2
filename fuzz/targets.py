"""The fuzz targets: one function per loader, taking ``bytes``, plus the structure-aware mutators the runner uses.

Each target writes its input under a per-process temporary folder (on ``/dev/shm`` where there is one), calls the
public loaders on it, and passes every exception through :func:`classify`:

- a *clean refusal* is one of stablekit's own error classes (:data:`CLEAN_ERRORS`) with a message: swallowed;
- an *oom* is a MemoryError, raised or wrapped (the runner caps the address space below the RSS cap, so that an
  input asking for too much is caught here, with its input, rather than by libFuzzer or the kernel);
- a *crash* is anything else (IndexError, a bare ValueError from json or numpy, RecursionError, a torch
  RuntimeError, ...): recorded, then raised, so that libFuzzer writes the input as a crash artifact (with
  ``keep_going`` it is only recorded, under :data:`findings` and in the findings folder, and the run goes on);
- a *soft finding* is a clean refusal that still smells: its cause is an exception that points at a bug in our code
  rather than at bad input (:data:`SUSPECT_CAUSES`, see :func:`_input_driven`: an IndexError our own unpickling
  code raised, then had wrapped into a :class:`CheckpointError`), or its message spans lines or does not name the
  file. Recorded, never raised;
- a *memory* finding is the first input to take the process's peak RSS past another whole GiB (kept whatever
  the outcome: a clean refusal may still cost gigabytes);
- a *hang* is an input still running after ``timeout_s`` CPU seconds: interrupted by a watchdog and recorded where
  it was (libFuzzer's wall-clock ``-timeout`` stays the backstop, for time spent inside C code).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import tempfile
import threading
import traceback
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stablekit.images import ImageError, load_image, mask_tensor, resized, to_mask, to_rgb
from stablekit.pipelines.inputs import pixels
from stablekit.text.tokenizer import TokenizerError
from stablekit.weights import load_model, probe
from stablekit.weights.convert import WeightsError
from stablekit.weights.load import CheckpointError, read_checkpoint
from stablekit.weights.pickle_safe import UnsafePickleError

CLEAN_ERRORS: tuple[type[BaseException], ...] = (
    CheckpointError,
    WeightsError,
    UnsafePickleError,
    ImageError,
    TokenizerError,  # a diffusers folder's tokenizer/ files
)
# As the cause of a clean refusal, these say the reader itself failed (a bug) rather than that the input is bad.
SUSPECT_CAUSES: tuple[type[BaseException], ...] = (
    MemoryError,
    RecursionError,
    IndexError,
    KeyError,
    AttributeError,
    AssertionError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
    NameError,
    SystemError,
    RuntimeError,
)

# The files of a diffusers folder the diffusers target may replace or delete; the first byte of an input picks one.
# The weights are not among them: their bytes are the safetensors target's business, and 1 MB inputs fuzz slowly.
FOLDER_FILES = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "low_res_scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
)
FOLDER_KINDS = ("sd1", "x4")


# --- findings -----------------------------------------------------------------------------------------------------


class Finding(Exception):
    """Raised by a target in place of a crash when not keeping going; the original is its cause."""


class Findings:
    """Counts per signature; the first input of each signature is saved (``.bin``) with its traceback (``.txt``)."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.keep_going = False
        self.timeout_s = 10.0
        self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.counts: Counter[str] = Counter()
        self.inputs: Counter[str] = Counter()  # per target: executed, refused (by the reader), read
        self.examples: dict[str, bytes] = {}

    def record(self, target: str, kind: str, signature: str, data: bytes, exc: BaseException) -> None:
        key = f"{target} {kind}: {signature}"
        self.counts[key] += 1
        if self.counts[key] > 1:
            return
        self.examples[key] = data
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            stem = self.folder / f"{target}-{kind}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
            stem.with_suffix(".bin").write_bytes(data)
            text = "".join(traceback.format_exception(exc))
            stem.with_suffix(".txt").write_text(f"{key}\n\n{text}")
        self.save()

    def save(self) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        summary = {"inputs": dict(self.inputs), "findings": dict(self.counts)}
        (self.folder / f"counts-{os.getpid()}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))


findings = Findings()


def configure(
    *, findings_dir: str | os.PathLike[str] | None = None, keep_going: bool = False, timeout_s: float = 10.0
) -> None:
    """Where findings go, whether a crash stops the run, and the per-input CPU-time limit (0: none)."""
    findings.folder = Path(findings_dir) if findings_dir is not None else None
    findings.keep_going = keep_going
    findings.timeout_s = timeout_s


def _where(exc: BaseException) -> str:
    """The innermost stablekit frame (the code that should have refused cleanly), then the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    ours = [f for f in frames if f"{os.sep}stablekit{os.sep}" in f.filename]
    last = frames[-1]
    inner = f"{Path(last.filename).name}:{last.name}"
    if not ours:
        return inner
    f = ours[-1]
    here = f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}:{f.lineno}"
    return here if f is last else f"{here} -> {inner}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc.__cause__ or exc.__context__
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _input_driven(cause: BaseException) -> bool:
    """Whether an exception wrapped into a clean refusal says only that the input is bad. Memory and recursion
    are resource problems wherever they happen (but json's recursion, one level per "[" of the input); other
    suspect types count when our own Python code raised them, not a library parsing the input (zipfile's
    NotImplementedError for an unknown compression) nor the C unpickler executing the input's opcodes (BUILD on
    an int is an AttributeError raised at our ``unpickler.load()`` line)."""
    frames = traceback.extract_tb(cause.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    if isinstance(cause, RecursionError):
        return f"{os.sep}json{os.sep}" in last.filename
    ours = f"{os.sep}stablekit{os.sep}" in last.filename
    return not ours or ".load()" in (last.line or "")


def classify(exc: Exception, names: str | None = None) -> tuple[str, str] | None:
    """``None`` for a clean refusal, else ``(kind, signature)``: kind ``oom`` (a MemoryError, raised or wrapped: the
    input asked for more than the runner's memory cap), ``crash`` or ``soft``. ``names``: a path the message should
    contain."""
    message = str(exc)
    for e in (exc, *_causes(exc)):
        if isinstance(e, MemoryError):
            return "oom", f"{type(exc).__name__} from MemoryError at {_where(e)}"
    if not isinstance(exc, CLEAN_ERRORS) or not message.strip():
        return "crash", f"{type(exc).__module__}.{type(exc).__qualname__} at {_where(exc)}"
    for cause in _causes(exc):
        if isinstance(cause, SUSPECT_CAUSES) and not _input_driven(cause):
            return "soft", f"{type(exc).__name__} wrapping {type(cause).__name__} at {_where(cause)}"
    if "\n" in message:
        return "soft", f"multi-line {type(exc).__name__} message at {_where(exc)}"
    # These promise to name the file (WeightsError speaks of tensors, not files).
    if names is not None and isinstance(exc, CheckpointError | ImageError | TokenizerError) and names not in message:
        return "soft", f"{type(exc).__name__} message without the path at {_where(exc)}"
    return None


class MemoryWarning(Warning):
    """Recorded (never raised) for an input that took the process's peak RSS past another GiB."""


class InputTimeout(BaseException):
    """Raised by the watchdog in the middle of a slow input; a BaseException, so that no loader's ``except
    Exception`` turns it into a clean refusal."""


def _on_timeout(signum: int, frame: Any) -> None:
    raise InputTimeout(f"one input took over {findings.timeout_s} s of CPU time")


class _Run:
    """One input through one target: each loader call is a step; clean refusals end the step, not the input.

    A context manager: a watchdog (``ITIMER_PROF``, CPU seconds, so that a busy machine does not count; libFuzzer's
    own ``-timeout`` uses SIGALRM and wall time, and stays the backstop) interrupts an input after
    ``findings.timeout_s`` and records it as a hang where it was interrupted.
    """

    def __init__(self, target: str, data: bytes, names: str | None) -> None:
        self.target, self.data, self.names = target, data, names
        self.steps = 0
        self.refused = False  # by the first step: the reader itself

    def __enter__(self) -> _Run:
        if findings.timeout_s > 0 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGPROF, _on_timeout)
            signal.setitimer(signal.ITIMER_PROF, findings.timeout_s)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if findings.timeout_s > 0 and threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_PROF, 0)
        # The process's peak RSS only grows: the first input to take it past each whole GiB is kept, with the
        # size, so that an input that is refused cleanly but costs gigabytes on the way is still seen.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak // 2**30 > findings.peak_rss // 2**30:
            detail = f"peak RSS past {peak // 2**30} GiB ({peak / 2**30:.2f} GiB)"
            findings.record(
                self.target, "memory", f"peak RSS past {peak // 2**30} GiB", self.data, MemoryWarning(detail)
            )
        findings.peak_rss = max(findings.peak_rss, peak)
        if isinstance(exc, InputTimeout):
            findings.record(self.target, "hang", f"over {findings.timeout_s} s at {_where(exc)}", self.data, exc)
            findings.inputs[f"{self.target} executed"] += 1
            return findings.keep_going  # swallowed when keeping going; libFuzzer reports it otherwise
        if exc is None:
            self.done()
        return False

    def step(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            self.refused = self.refused or self.steps == 1
            verdict = classify(e, self.names)
            if verdict is None:
                return None
            kind, signature = verdict
            findings.record(self.target, kind, signature, self.data, e)
            if kind in ("crash", "oom") and not findings.keep_going:
                traceback.print_exception(e)  # atheris prints the Finding alone, without its cause
                raise Finding(f"{self.target}: {signature}") from e
            return None

    def done(self) -> None:
        findings.inputs[f"{self.target} executed"] += 1
        findings.inputs[f"{self.target} {'refused' if self.refused else 'read'}"] += 1
        if findings.folder is not None and findings.inputs[f"{self.target} executed"] % 2000 == 0:
            findings.save()


# --- a private scratch folder -------------------------------------------------------------------------------------

_PREFIX = "stablekit-fuzz-"
_work: Path | None = None


def _remove_stale(root: str) -> None:
    """Scratch folders of runs that ended without cleaning up (libFuzzer exits without running atexit)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if not name.startswith(_PREFIX):
                continue
            pid = name[len(_PREFIX) :].split("-")[0]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def workdir() -> Path:
    global _work
    if _work is None:
        root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        _remove_stale(root)
        _work = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
        atexit.register(shutil.rmtree, _work, True)
    return _work


def _write(name: str, data: bytes) -> Path:
    path = workdir() / name
    # Unlink rather than truncate: a reader may still map the previous input, and truncating a mapped file under
    # it would turn its next access into SIGBUS.
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.write_bytes(data)
    return path


# --- targets ------------------------------------------------------------------------------------------------------


def safetensors(data: bytes) -> None:
    path = _write("input.safetensors", data)
    with _Run("safetensors", data, str(path)) as run:
        run.step(read_checkpoint, path, shapes_only=True)
        run.step(read_checkpoint, path)
        run.step(probe, path)


def _torch(target: str, data: bytes) -> None:
    path = _write("input.ckpt", data)
    with _Run(target, data, str(path)) as run:
        if run.step(read_checkpoint, path) is not None:
            run.step(probe, path)


def torch_zip(data: bytes) -> None:
    _torch("zip", data)


def torch_legacy(data: bytes) -> None:
    _torch("legacy", data)


def image(data: bytes) -> None:
    path = _write("input.img", data)
    with _Run("image", data, str(path)) as run:
        img = run.step(load_image, path, what="image")
        if img is not None:
            # As the image tasks take an input and a mask: converted, then resized to the (limited) output size.
            run.step(pixels, img, 64, 48)
            mask = run.step(to_mask, img)
            if mask is not None:
                run.step(lambda m: mask_tensor(resized(m, 64, 48)), mask)
            run.step(to_rgb, img, (0, 0, 0))


class _Folders:
    """Private copies of the template folders; each input replaces (or deletes) one file and puts it back after."""

    def __init__(self) -> None:
        self.templates: dict[str, Path] = {}
        self.copies: dict[str, Path] = {}

    def use(self, templates: dict[str, Path]) -> None:
        self.templates = dict(templates)
        self.copies = {}

    def copy(self, kind: str) -> Path:
        if kind not in self.copies:
            if kind not in self.templates:
                raise RuntimeError("fuzz.targets.use_folders() was not given a template folder of kind " + kind)
            dest = workdir() / f"folder-{kind}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(self.templates[kind], dest)
            self.copies[kind] = dest
        return self.copies[kind]


_folders = _Folders()
use_folders = _folders.use


def _mark(kind: str, name: str, delete: bool) -> None:
    """Does nothing, with one branch per template, file and action: the runner instruments it, so that an input
    for another file is new coverage (every valid folder runs the same reader code, and libFuzzer would otherwise
    keep one seed and drop the rest)."""
    if kind == "x4":
        pass
    if delete:
        pass
    if name == "model_index.json":
        pass
    elif name == "unet/config.json":
        pass
    elif name == "vae/config.json":
        pass
    elif name == "text_encoder/config.json":
        pass
    elif name == "scheduler/scheduler_config.json":
        pass
    elif name == "low_res_scheduler/scheduler_config.json":
        pass
    elif name == "tokenizer/vocab.json":
        pass
    elif name == "tokenizer/merges.txt":
        pass
    elif name == "tokenizer/tokenizer.json":
        pass
    elif name == "tokenizer/tokenizer_config.json":
        pass


def diffusers_folder(data: bytes) -> None:
    """First byte: bit 7 deletes the chosen file instead of writing the rest of the input into it, bit 6 picks the
    x4 template over sd1, the low bits pick the file (:data:`FOLDER_FILES`)."""
    if not data:
        return
    kind = FOLDER_KINDS[(data[0] >> 6) & 1]
    if kind not in _folders.templates and _folders.templates:
        kind = next(iter(_folders.templates))  # the short test run builds sd1 only
    name = FOLDER_FILES[(data[0] & 0x3F) % len(FOLDER_FILES)]
    _mark(kind, name, bool(data[0] & 0x80))
    folder = _folders.copy(kind)
    path = folder / name
    original = path.read_bytes() if path.is_file() else None
    try:
        if data[0] & 0x80:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data[1:])
        with _Run("diffusers", data, str(folder)) as run:
            found = run.step(probe, folder)
            if found is not None and name.startswith(("model_index", "scheduler", "low_res")) and data[-1] % 8 == 0:
                # The configs that change nothing the weights pin down: one in eight such inputs (by its last
                # byte) is loaded in full too; model building dominates the time of an input that probes.
                run.step(load_model, folder)
    finally:
        if original is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            path.write_bytes(original)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors": safetensors,
    "zip": torch_zip,
    "legacy": torch_legacy,
    "diffusers": diffusers_folder,
    "image": image,
}


# --- mutators -----------------------------------------------------------------------------------------------------

ByteMutator = Callable[[bytes, int], bytes]

_DEEP, _BIG = "@@deep@@", "@@bigint@@"
_INTERESTING: list[Any] = [
    0, -1, 1, 2, 3, 4, 7, 8, 32, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
    -(2**63), 10**30, 0.5, -0.0, 1.5, 1e308, 1e-320, float("nan"), float("inf"), float("-inf"),
    "", "a", "x" * 300, "\udcff", "../../etc/passwd", None, True, False, [], {}, [0], [1, 2, 3], [[1]], {"a": 1},
    "F32", "F16", "BF16", "I64", "BOOL", "F8_E4M3", "U8", "epsilon", "v_prediction", "sample", "linear",
    "scaled_linear", "squaredcos_cap_v2", "leading", "trailing", "gelu", "quick_gelu", "CrossAttnDownBlock2D",
    "DownBlock2D", "UpBlock2D", "DownEncoderBlock2D", "PNDMScheduler", "DDIMScheduler", "DDPMScheduler",
    "diffusers", "transformers", "UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "silu",
    _DEEP, _BIG,
]  # fmt: skip


def _nodes(obj: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) pair, depth first; iterative, as json reads nesting deeper than Python recurses."""
    out: list[tuple[Any, Any]] = []
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            stack.append(v)
    return out


def _keys(obj: Any) -> set[str]:
    return {k for container, k in _nodes(obj) if isinstance(container, dict)}


def _nearby(v: Any, rng: random.Random) -> Any:
    if type(v) is int:
        return rng.choice([v + 1, v - 1, v * 2, -v, v // 2, 0, v + 2**32, v * 1000])
    if type(v) is float:
        return rng.choice([v * 2, -v, v + 1e-7, 0.0, int(v) if v == v and abs(v) < 1e18 else 0])
    if isinstance(v, str):
        return rng.choice([v + v, v[:-1], v.upper(), v + "\x00", int(v) if v.isdigit() else v + "1"])
    if isinstance(v, list):
        return rng.choice([v + v[:1], v[1:], list(reversed(v)), [v]])
    return rng.choice(_INTERESTING)


def mutate_json(obj: Any, rng: random.Random) -> str:
    """One to three structural edits of a parsed JSON document, re-serialised (NaN/Infinity allowed, as Python's
    json reads them; deep nesting and over-long integers spliced in as text, as json.dumps cannot write them)."""
    keys = sorted(_keys(obj)) or ["a"]
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(obj)
        if not nodes:
            obj = rng.choice([{}, [], {"a": obj}, rng.choice(_INTERESTING)])
            continue
        container, key = rng.choice(nodes)
        op = rng.randrange(6)
        if op == 0:
            container[key] = rng.choice(_INTERESTING)
        elif op == 1:
            container[key] = _nearby(container[key], rng)
        elif op == 2:
            del container[key]
        elif op == 3:
            if isinstance(container, dict):
                container[rng.choice(keys)] = rng.choice(_INTERESTING)
            else:
                container.insert(rng.randint(0, len(container)), rng.choice(_INTERESTING))
        elif op == 4:
            container[key] = [container[key]]
        else:
            other_container, other_key = rng.choice(nodes)
            container[key] = json.loads(json.dumps(other_container[other_key]))  # a copy of another subtree
    try:
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
    except (ValueError, RecursionError):
        return "{}"
    depth = rng.choice([100, 1000, 5000, 50000])
    text = text.replace(f'"{_DEEP}"', "[" * depth + "]" * depth)
    return text.replace(f'"{_BIG}"', "1" + "0" * rng.choice([20, 400, 5000]))


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _mutate_safetensors(data: bytes, rng: random.Random, byte_mutate: ByteMutator, max_size: int) -> bytes:
    if len(data) < 8 or rng.random() < 0.4:
        return byte_mutate(data, max_size)
    (n,) = struct.unpack("<Q", data[:8])
    header = _json_or_none(data[8 : 8 + n]) if n <= len(data) - 8 else None
    if header is None:
        return byte_mutate(data, max_size)
    raw = mutate_json(header, rng).encode("utf-8", "surrogatepass")
    body = data[8 + n :]
    if rng.random() < 0.2:
        body = body[: rng.randint(0, len(body))] if rng.random() < 0.5 else body + bytes(rng.randint(1, 64))
    length = len(raw) if rng.random() < 0.9 else len(raw) + rng.choice([-1, 1, 8, -8, 2**32])
    return struct.pack("<Q", length % 2**64) + raw + body


def _template_file(selector: int) -> bytes | None:
    kind = FOLDER_KINDS[(selector >> 6) & 1]
    folder = _folders.templates.get(kind)
    path = folder / FOLDER_FILES[(selector & 0x3F) % len(FOLDER_FILES)] if folder is not None else None
    return path.read_bytes() if path is not None and path.is_file() else None


def _mutate_folder_file(data: bytes, rng: random.Random, byte_mutate: ByteMutator, max_size: int) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    selector, content = data[:1], data[1:]
    if rng.random() < 0.25:
        # Start again from a pristine file, chosen uniformly: coverage alone piles the corpus onto the files whose
        # parsers have the most branches (the tokenizer's) and starves the others (the scheduler config's).
        pick = rng.choice([k << 6 | i for k in range(len(FOLDER_KINDS)) for i in range(len(FOLDER_FILES))])
        fresh = _template_file(pick)
        if fresh is not None:
            selector, content = bytes([pick]), fresh
    elif rng.random() < 0.05:
        selector = bytes([rng.randrange(256)])
    doc = _json_or_none(content) if rng.random() < 0.6 else None
    if doc is None:
        return selector + byte_mutate(content, max_size - 1)
    return selector + mutate_json(doc, rng).encode("utf-8", "surrogatepass")


def _mutate_zip(data: bytes, rng: random.Random, byte_mutate: ByteMutator, max_size: int) -> bytes:
    """Edits inside the archive (the pickle, a storage, the member list), re-zipped so the CRCs still hold."""
    if rng.random() < 0.4:
        return byte_mutate(data, max_size)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = [(info.filename, zf.read(info)) for info in zf.infolist()[:64]]
    except Exception:  # not a readable archive (any more): byte-level edits only
        return byte_mutate(data, max_size)
    if not members:
        return byte_mutate(data, max_size)
    pickles = [i for i, (name, _) in enumerate(members) if name.endswith("data.pkl")]
    i = rng.choice(pickles) if pickles and rng.random() < 0.6 else rng.randrange(len(members))
    name, content = members[i]
    op = rng.randrange(5)
    if op <= 1:
        members[i] = (name, byte_mutate(content, max(len(content) * 2, 64)))
    elif op == 2:
        members[i] = (name, content[: rng.randint(0, len(content))] + bytes(rng.choice([0, 0, 1, 4, 64])))
    elif op == 3:
        members[i] = (rng.choice([name + "x", name.replace("data", "dat"), "archive/data/" + str(rng.randrange(9))]),
                      content)  # fmt: skip
    else:
        members.insert(rng.randrange(len(members) + 1), members[i] if rng.random() < 0.5 else (name + "2", content))
    out = io.BytesIO()
    compression = zipfile.ZIP_DEFLATED if rng.random() < 0.2 else zipfile.ZIP_STORED
    with zipfile.ZipFile(out, "w", compression) as zf, warnings_off():
        for name, content in members:
            zf.writestr(name, content)
    return out.getvalue()[:max_size]


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names we write on purpose
        yield


_PNG = b"\x89PNG\r\n\x1a\n"


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC, so that a mutation reaches the decoder rather than the CRC check."""
    if not data.startswith(_PNG):
        return data
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        n = int.from_bytes(out[pos : pos + 4], "big")
        end = pos + 8 + n
        if end + 4 > len(out):
            break
        out[end : end + 4] = zlib.crc32(out[pos + 4 : end]).to_bytes(4, "big")
        pos = end + 4
    return bytes(out)


def _mutate_image(data: bytes, rng: random.Random, byte_mutate: ByteMutator, max_size: int) -> bytes:
    out = byte_mutate(data, max_size)
    return fix_png_crcs(out) if rng.random() < 0.9 else out


MUTATORS: dict[str, Callable[[bytes, random.Random, ByteMutator, int], bytes]] = {
    "safetensors": _mutate_safetensors,
    "zip": _mutate_zip,
    "diffusers": _mutate_folder_file,
    "image": _mutate_image,
}


def simple_byte_mutate(data: bytes, max_size: int, rng: random.Random | None = None) -> bytes:
    """A plain byte mutator (libFuzzer's stand-in where atheris is not used): flips, interesting bytes, inserts,
    deletes, truncation, duplication."""
    rng = rng or random.Random()
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(out))
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            i = rng.randrange(len(out))
            out[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord("["), ord('"'), ord("9")])
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and out:
            del out[pos : pos + rng.randint(1, 16)]
        elif op == 4:
            del out[pos:]
        elif out:
            j = rng.randrange(len(out))
            out[pos:pos] = out[j : j + rng.randint(1, 64)]
    return bytes(out[:max_size])


def mutate(
    target: str, data: bytes, seed: int, byte_mutate: ByteMutator | None = None, max_size: int = 1 << 16
) -> bytes:
    """The target's mutator (byte-level for the legacy stream, structure-aware for the others)."""
    rng = random.Random(seed)
    byte_mutate = byte_mutate or (lambda d, m: simple_byte_mutate(d, m, rng))
    fn = MUTATORS.get(target)
    try:
        out = fn(data, rng, byte_mutate, max_size) if fn is not None else byte_mutate(data, max_size)
    except (RecursionError, ValueError, TypeError, MemoryError):
        # A structure too deep or odd to re-serialise (the fuzzer grows such inputs): bytes it is. The mutator
        # must never raise: libFuzzer would stop the whole run.
        out = byte_mutate(data, max_size)
    return out[:max_size]
