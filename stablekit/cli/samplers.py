"""List the samplers, with the A1111 and diffusers names each also answers to."""

from __future__ import annotations

import argparse

from stablekit.diffusion import SAMPLERS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samplers", help="list the samplers and the names they accept", description=__doc__)
    p.add_argument("--names", action="store_true", help="print only the canonical names, one per line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.names:
        print("\n".join(SAMPLERS))
        return 0
    width = max(map(len, SAMPLERS))
    for name, info in SAMPLERS.items():
        print(f"{name:<{width}}  {info.description} [also: {', '.join(info.aliases)}]")
    return 0
