"""`dcml serve`: an index and its model behind HTTP (FastAPI, run by uvicorn).

The pieces are small and testable apart: :mod:`.limits` (what a request may ask for),
:mod:`.gate` (the token and the body-size limit, checked before a route runs), :mod:`.uploads`
(bytes -> image, every failure a 4xx), :mod:`.batcher` (concurrent requests share forward passes),
:mod:`.state` (the served index: searched lock-free, replaced whole by writes and reloads) and
:mod:`.app` (the routes).
"""

from dcml.serve.limits import ServeLimits

__all__ = ["ServeLimits", "create_app"]


def __getattr__(name: str):
    # The app pulls in FastAPI and torch; `dcml --help` reads only the limits, so that waits until asked for.
    if name == "create_app":
        from dcml.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
