"""Wall time of the README's first command with the built-in demo model, start-up included.

    python benchmarks/bench_demo_cli.py [--runs 5]

Runs ``stablekit generate "a red circle on a blue background" -o OUT`` as a fresh process each time (the cost a
user sees: interpreter, torch import, loading the model, sampling, PNG) and prints each time, the median and the
import-only floor (``python -c "import torch"``) for comparison.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    exe = shutil.which("stablekit") or str(Path(sys.executable).with_name("stablekit"))
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.png")
        cmd = [exe, "generate", "a red circle on a blue background", "-o", out, "--seed", "1"]
        timed(cmd)  # warm the page cache, as any second run would be
        runs = [timed(cmd) for _ in range(args.runs)]
        floor = [timed([sys.executable, "-c", "import torch"]) for _ in range(args.runs)]
    print(f"stablekit generate (demo, defaults): {', '.join(f'{t:.2f}' for t in runs)} s")
    print(f"  median {statistics.median(runs):.2f} s, max {max(runs):.2f} s")
    print(f"python -c 'import torch': median {statistics.median(floor):.2f} s")


if __name__ == "__main__":
    main()
