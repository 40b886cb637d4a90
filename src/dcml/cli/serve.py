"""`dcml serve INDEX`: search an index over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dcml.cli.arguments import int_in_range, positive_int

_port = int_in_range(0, 65535, "a port in 0..65535 (0: any free port)")
_wait_ms = int_in_range(0, 1000, "a wait in 0..1000 milliseconds")


def register(subparsers) -> None:
    from dcml.serve.limits import MIN_TOKEN_LENGTH, TOKEN_ENVIRONMENT

    parser = subparsers.add_parser(
        "serve", help="serve an index over HTTP: search, embed, items, info (OpenAPI docs at /docs)",
        description="Load an index and its model once and answer HTTP requests: POST /search (uploaded images "
        "in the multipart field 'images', or a JSON body {\"vectors\": [[...]]}; k and threshold in the query "
        "string or the body), POST /embed, GET /items/ID, GET /info, GET /health. Concurrent requests share "
        "forward passes. Binds 127.0.0.1 by default; another address needs a token (or --insecure). "
        f"With a token (--token, or ${TOKEN_ENVIRONMENT}; at least {MIN_TOKEN_LENGTH} characters) every request "
        "must send 'Authorization: Bearer TOKEN'. --allow-writes adds POST /items (append uploaded images, "
        "persisted atomically) and POST /reload (swap in the folder rebuilt on disk) and needs a token too.",
    )
    parser.add_argument("index", type=Path, metavar="INDEX", help="an index folder (dcml index build)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--model", type=Path, default=None, metavar="RUN",
                        help="the index's model (default: the checkpoint its manifest names); checked by sha256")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENVIRONMENT}); "
                        "prefer the environment variable, a flag is visible to other users in ps")
    parser.add_argument("--allow-writes", action="store_true", help="enable POST /items and POST /reload (needs a token)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host or --allow-writes without a token")
    parser.add_argument("--max-k", type=int_in_range(1, 10_000, "k in 1..10000"), default=100,
                        help="largest k a request may ask for (default: %(default)s)")
    parser.add_argument("--max-images", type=int_in_range(1, 1024, "1..1024 images"), default=32,
                        help="images per request (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=int_in_range(1, 1024, "1..1024 MB"), default=16,
                        help="largest request body, MB (default: %(default)s)")
    parser.add_argument("--max-image-pixels", type=positive_int, default=40_000_000,
                        help="largest image, width x height, decoded (default: %(default)s; decompression-bomb guard)")
    parser.add_argument("--batch-size", type=int_in_range(1, 1024, "a batch of 1..1024 images"), default=32,
                        help="most images in one shared forward pass (default: %(default)s)")
    parser.add_argument("--batch-wait-ms", type=_wait_ms, default=2,
                        help="how long a forward pass waits for more requests to join it (default: %(default)s ms)")
    parser.add_argument("--max-concurrency", type=positive_int, default=256,
                        help="connections served at once; more get 503 (default: %(default)s)")
    parser.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level; info also logs every request (default: %(default)s)")
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from dcml.search.index import Index
    from dcml.serve import ServeLimits, create_app
    from dcml.serve.limits import TOKEN_ENVIRONMENT, check_exposure
    from dcml.serve.server import listen, make_server, url_of
    from dcml.serve.state import ServedIndex

    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENVIRONMENT) or None)
    check_exposure(args.host, token, args.allow_writes, args.insecure)
    limits = ServeLimits(max_k=args.max_k, max_images=args.max_images, max_upload_bytes=args.max_upload_mb << 20,
                         max_image_pixels=args.max_image_pixels, max_batch=args.batch_size, batch_wait_ms=args.batch_wait_ms)
    index = Index.load(args.index)
    model = _load_model(args, index)
    served = ServedIndex(index, model)
    app = create_app(served, limits=limits, token=token, allow_writes=args.allow_writes)
    sock = listen(args.host, args.port)
    server = make_server(app, log_level=args.log_level, access_log=args.log_level in ("info", "debug"),
                         max_concurrency=args.max_concurrency)
    print(f"dcml serve: {index.folder} ({len(index)} items) on {url_of(sock)} "
          f"(docs at /docs; {'token required' if token else 'no token'}; writes {'on' if args.allow_writes else 'off'})",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0


def _load_model(args: argparse.Namespace, index):
    """--model, else the checkpoint the manifest names, on --device; ServedIndex checks its sha256."""
    from dcml.errors import UserError
    from dcml.inference import load_model

    source = args.model
    if source is None:
        source = index.manifest["model"].get("checkpoint")
        if not source or not Path(source).is_file():
            raise UserError(f"the checkpoint index {index.folder} was built with ({source}) is gone; pass --model RUN")
    return load_model(source, device=args.device)
