"""``stablekit`` command line: one module per sub-command, each with ``add_parser`` and ``run``.

Commands use only the public API (``stablekit.pipelines``, ``stablekit.weights``, ``stablekit.diffusion``).
Errors the user can fix (bad paths, bad options, bad files) print one line and exit 1; they never show a traceback.
(Only argparse's own usage errors exit 2, as every argparse program does.)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = (
    "generate",
    "img2img",
    "inpaint",
    "depth2img",
    "upscale",
    "info",
    "convert",
    "samplers",
    "train",
    "serve",
    "batch",
    "compile",
    "eval",
    "watermark",
)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"stablekit.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Building the parser imports every command, and torch with them: seconds in which Ctrl-C is likely.
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("stablekit: interrupted", file=sys.stderr)
        return 130
    try:
        return int(args.run(args))
    except (UserError, ValueError) as e:
        # ValueError covers our loaders' and validators' errors (WeightsError and friends subclass it).
        print(f"stablekit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A file that cannot be read or written (permissions, a full disk, a missing folder): the user's to fix.
        where = f"{e.filename}: " if e.filename and str(e.filename) not in str(e) else ""
        print(f"stablekit {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        # NonFiniteError and friends: the run failed for a reason the message explains; no traceback.
        if type(e).__module__.startswith("stablekit"):
            print(f"stablekit {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("stablekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
