"""The atheris runner: ``python -m fuzz.run TARGET [libFuzzer flags] [CORPUS_DIR ...]``.

TARGET is one of safetensors, zip, legacy, diffusers, image (:mod:`fuzz.targets`). Without a corpus folder the
runner uses ``fuzz/corpus/TARGET/``, building the seeds first when it is missing (``python -m fuzz.corpus``);
libFuzzer adds the inputs that reach new code to the first corpus folder given. The mutators are structure-aware
where a format has a structure (safetensors' JSON header, the folder's JSON files, the members of a torch zip
re-zipped with valid CRCs, PNG chunk CRCs recomputed), and fall back to libFuzzer's own byte mutations otherwise.
Only stablekit is instrumented, but for the image target Pillow's Python plugins are too (stablekit's own image
code is a few dozen lines, and coverage should tell one decoder path from another).

The long runs (one at a time, at low priority, see fuzz/RESULTS.md)::

    mkdir -p fuzz/artifacts fuzz/logs
    OMP_NUM_THREADS=1 FUZZ_KEEP_GOING=1 FUZZ_FINDINGS=fuzz/findings/safetensors nice -n 19 \\
        /usr/bin/time -v -o fuzz/logs/safetensors.time .venv/bin/python -m fuzz.run safetensors \\
        -runs=300000 -rss_limit_mb=3072 -timeout=30 -max_len=16384 -keep_seed=1 -print_final_stats=1 \\
        -artifact_prefix=fuzz/artifacts/safetensors- > fuzz/logs/safetensors.log 2>&1

and likewise ``zip`` (-max_len=16384), ``legacy`` (-max_len=16384), ``diffusers`` (-max_len=8192) and ``image``
(-max_len=8192). ``-keep_seed=1`` matters for diffusers, where every valid seed runs the same reader code: without
it libFuzzer keeps one seed folder file and drops the rest. A short smoke run: ``-runs=2000``. One input again
(a finding's ``.bin``, a crash artifact): ``python -m fuzz.run TARGET FILE``.

Environment:

- ``FUZZ_KEEP_GOING=1``: a crash (an exception that is not a clean refusal) is recorded and the run goes on; by
  default it is raised, and libFuzzer stops and writes the input to ``<artifact_prefix>crash-<sha1>``;
- ``FUZZ_MEMORY_MB`` (default 2304, 0: off): the address space is capped at the imports' (~0.6 GB) plus this, so
  that total memory stays under the 3 GiB cap and an input asking for more gets a MemoryError, recorded as an
  ``oom`` finding, instead of taking the machine's memory; libFuzzer's ``-rss_limit_mb=3072`` stays the backstop
  (it stops the run and writes an ``oom-…`` artifact);
- ``FUZZ_TIMEOUT_S`` (default 10, 0: off): CPU seconds one input may take before the watchdog interrupts it and
  records a hang (libFuzzer's ``-timeout`` is wall time on a shared machine: give it more, e.g. 30, as a backstop);
- ``FUZZ_FINDINGS=DIR`` (default ``fuzz/findings``): the first input and traceback of every distinct signature
  (crash, oom, hang, memory, soft: see :mod:`fuzz.targets`), and ``counts-<pid>.json`` (inputs executed, refused
  by the reader, read; findings by signature), rewritten every 2000 inputs and at each new signature.

The corpus is kept between runs, so a stopped run (Ctrl-C) resumes where it was.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import atheris

# Imported before instrumentation starts, so that torch, numpy and safetensors are not instrumented.
import numpy  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401

# stablekit is; and for the image target Pillow's Python plugins too (PNG chunks, JPEG markers, EXIF).
_INSTRUMENT = ["stablekit", "PIL"] if sys.argv[1:2] == ["image"] else ["stablekit"]
with atheris.instrument_imports(include=_INSTRUMENT):
    import PIL.Image  # noqa: F401
    import PIL.ImageOps  # noqa: F401
    import PIL.JpegImagePlugin  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import PIL.TiffImagePlugin  # noqa: F401  (EXIF)
    import PIL.WebPImagePlugin  # noqa: F401

    import stablekit.images  # noqa: F401
    import stablekit.pipelines.inputs  # noqa: F401
    import stablekit.weights  # noqa: F401
    import stablekit.weights.diffusers  # noqa: F401
    import stablekit.weights.load  # noqa: F401
    import stablekit.weights.pickle_safe  # noqa: F401

from fuzz import targets  # noqa: E402

HERE = Path(__file__).resolve().parent


def _cap_memory(mb: int) -> None:
    """Address space capped at what the process maps now (torch's libraries, ~0.6 GB) plus ``mb``, just under the
    3 GiB RSS cap: an input asking for more gets a MemoryError, recorded with its input as an ``oom`` finding, and
    the run goes on, where libFuzzer's once-a-second RSS check would stop it (or be too late: a 9-byte pickle can
    make CPython's unpickler zero 32 GB of memo)."""
    if mb <= 0:
        return
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = size_kb * 1024 + mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def main() -> None:
    argv = sys.argv
    if len(argv) < 2 or argv[1] not in targets.TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(targets.TARGETS)}}} [libFuzzer flags] [CORPUS_DIR ...]")
    name, rest = argv[1], argv[2:]
    out = HERE / "corpus"
    if not any(not a.startswith("-") for a in rest):
        seeds = out / name
        if not seeds.is_dir() or not any(seeds.iterdir()):
            from fuzz import corpus  # diffusers and transformers are needed only to build seeds

            corpus.build(name, out)
        rest.append(str(seeds))
    if name == "diffusers":
        from fuzz.corpus import folders_in

        folders = folders_in(out)
        if not all((f / "model_index.json").is_file() for f in folders.values()):
            from fuzz import corpus

            corpus.build("diffusers", out)
        targets.use_folders(folders)
    targets.configure(
        findings_dir=os.environ.get("FUZZ_FINDINGS", str(HERE / "findings")),
        keep_going=os.environ.get("FUZZ_KEEP_GOING") == "1",
        timeout_s=float(os.environ.get("FUZZ_TIMEOUT_S", "10")),
    )
    _cap_memory(int(os.environ.get("FUZZ_MEMORY_MB", "2304")))
    targets._mark = atheris.instrument_func(targets._mark)  # see its docstring
    target = targets.TARGETS[name]

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return targets.mutate(name, data, seed, atheris.Mutate, max_size)

    extra = {"custom_mutator": custom_mutator} if name in targets.MUTATORS else {}
    atheris.Setup([argv[0], *rest], target, **extra)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
