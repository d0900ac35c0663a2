"""``stablekit serve``: the model behind HTTP: the Azure ML schema at ``/score``, the AUTOMATIC1111 API at
``/sdapi/v1/``, and stablekit's job API at ``/v1/`` (progress as Server-Sent Events, cancel).

It listens on 127.0.0.1 unless told otherwise. ``--api-key`` (or the STABLEKIT_API_KEY environment variable)
requires ``Authorization: Bearer KEY`` on every route but ``/`` and ``/health``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from stablekit.cli import UserError
from stablekit.cli.options import DEMO_MODEL, add_model_options, load_pipeline
from stablekit.demo import model_path

API_KEY_ENV = "STABLEKIT_API_KEY"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (Azure ML, A1111 and job APIs)", description=__doc__)
    add_model_options(p, default_help="default: the built-in demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860, as A1111)")
    p.add_argument("--api-key", help=f"require this bearer token (default: ${API_KEY_ENV}, else none)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more get 429 (16)")
    p.add_argument("--max-batch-images", type=int, default=8, help="images in one merged UNet batch (8)")
    p.add_argument("--no-batching", action="store_true", help="run each request on its own")
    p.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="largest request body (32 MiB)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow browsers on this origin (repeatable)")
    p.set_defaults(run=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from stablekit.serve import ServeSettings, Service, WorkerSettings, create_app
    except ImportError as e:
        raise UserError(f"serving needs the [serve] extra: pip install 'stablekit[serve]' ({e})") from e
    for name in ("port", "max_queue", "max_batch_images", "max_body_bytes"):
        value = getattr(args, name)
        if value < (0 if name == "max_queue" else 1) or (name == "port" and value > 65535):
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range")
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServeSettings(
        api_key=key,
        max_body_bytes=args.max_body_bytes,
        cors_origins=tuple(args.cors_origin),
        worker=WorkerSettings(
            max_queue=args.max_queue, batching=not args.no_batching, max_batch_images=args.max_batch_images
        ),
    )
    sock = _bind(args.host, args.port)  # before the model loads: a taken port fails in a second, with exit 1
    if not _is_loopback(args.host) and key is None:
        print(
            f"warning: listening on {args.host} without an API key: anyone who can reach it can use it", file=sys.stderr
        )
    pipe = load_pipeline(args, model_path, DEMO_MODEL)
    app = create_app(Service(pipe, settings))
    print(f"stablekit serve: {pipe.name} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock
