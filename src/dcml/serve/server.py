"""Running the app with uvicorn on a socket dcml opens itself.

Opening the socket here (not inside uvicorn) turns a taken port into dcml's one-line error
instead of uvicorn's log line and exit, and lets ``--port 0`` pick a free port whose number is
known before the first request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from dcml.errors import UserError


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    # Accepted connections inherit this: without it a response sent in two writes (headers, body)
    # waits for the client's delayed ACK, about 40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def make_server(app, *, log_level: str = "warning", access_log: bool = False, max_concurrency: int | None = None) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, limit_concurrency=max_concurrency,
                            timeout_graceful_shutdown=10, lifespan="on")
    return uvicorn.Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serving_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0, **options) -> Iterator[str]:
    """Serve ``app`` from a background thread (tests, benchmarks); yields its base URL, stops it on exit."""
    sock = listen(host, port)
    server = make_server(app, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dcml-serve-http", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(start_timeout)
        sock.close()
