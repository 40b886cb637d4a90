"""Checks every request passes before any route runs: the token, then the size of its body.

A plain ASGI middleware rather than a FastAPI dependency, so that it also covers what no route
declares (``/docs``, ``/openapi.json``, unknown paths) and so that an unauthenticated or oversized
upload is refused before its body is read.
"""

from __future__ import annotations

import secrets

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dcml.atomic_files import json_text
from dcml.serve.limits import RequestProblem


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return Response(json_text({"error": reason}), status_code=status, media_type="application/json", headers=headers)


class Gate:
    """Token (``Authorization: Bearer TOKEN``) and body-size checks around an ASGI app."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int):
        self.app = app
        self.token = None if token is None else token.encode()
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        if self.token is not None and not self._authorised(headers.get(b"authorization", b"")):
            await error_response(401, "missing or wrong token: send the header 'Authorization: Bearer TOKEN'",
                                 {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error_response(400, "Content-Length is not a number")(scope, receive, send)
                return
            if size > self.max_body_bytes:
                await error_response(413, self._too_large())(scope, receive, send)
                return
        await self.app(scope, self._bounded(receive), send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, presented = header.partition(b" ")
        # compare_digest: the time taken does not tell a caller how much of a guess was right.
        return scheme.lower() == b"bearer" and secrets.compare_digest(presented.strip(), self.token)

    def _too_large(self) -> str:
        return f"the request body is over this server's limit of {self.max_body_bytes:,} bytes"

    def _bounded(self, receive: Receive) -> Receive:
        """``receive`` that stops a body sent without (or beyond) its Content-Length at the limit.

        The error is raised inside the route that reads the body, where the app's handler for
        :class:`RequestProblem` turns it into the 413."""
        received = 0

        async def bounded() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise RequestProblem(413, self._too_large())
            return message

        return bounded
