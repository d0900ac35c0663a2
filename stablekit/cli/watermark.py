"""``stablekit watermark-check``: which of the reference scripts' invisible watermarks an image carries.

An image carries a watermark when every bit of it decodes, as the reference scripts' own checker requires; the
JSON lines also give, per known watermark, the fraction of its bits that decode (about half for an unmarked
image). Re-encoded (JPEG) or resized copies usually lose the mark: "none" does not prove an image unmarked.
"""

from __future__ import annotations

import argparse
import json

from stablekit.images import load_image
from stablekit.watermark import check


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watermark-check",
        help="say which invisible watermark (StableDiffusionV1, SDV2) images carry",
        description=__doc__,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or WebP files, at least 256 px a side")
    p.add_argument("--json", action="store_true", help="one JSON object per image: path, found, agreement")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for path in args.images:
        # load_image refuses folders, FIFOs, other formats and decompression bombs before decoding pixels.
        found = check(load_image(path), f"image {path!r}")
        if args.json:
            print(json.dumps({"path": path, "found": found.found, "agreement": found.agreement}), flush=True)
        else:
            print(f"{path}: {found.found or 'none'}", flush=True)
    return 0
