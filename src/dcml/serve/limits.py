"""What one request may ask of the server, and who may reach it at all."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from dcml.errors import UserError

#: Environment variable read when ``--token`` is not given (a flag shows up in ``ps``; the environment does not).
TOKEN_ENVIRONMENT = "DCML_SERVE_TOKEN"
#: Shorter tokens are refused: a guessable token is no access control.
MIN_TOKEN_LENGTH = 16


class RequestProblem(Exception):
    """A request the server refuses: an HTTP status and a one-line reason for the caller."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = int(status)
        self.reason = " ".join(str(reason).split())  # one line, whatever the source message held


@dataclass(frozen=True)
class ServeLimits:
    """Per-request bounds; each keeps one request from costing the server unbounded memory or time."""

    max_k: int = 100
    max_images: int = 32
    max_vectors: int = 1024
    max_upload_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_batch: int = 32
    batch_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        from dcml.data.images import DEFAULT_MAX_IMAGE_PIXELS

        for name in ("max_k", "max_images", "max_vectors", "max_upload_bytes", "max_image_pixels", "max_batch"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_image_pixels > DEFAULT_MAX_IMAGE_PIXELS:
            # Above Pillow's own limit the header check itself needs Pillow's bomb guard lifted
            # process-wide; the server never does that.
            raise UserError(f"max_image_pixels is at most {DEFAULT_MAX_IMAGE_PIXELS:,} (Pillow's limit), got {self.max_image_pixels:,}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise UserError(f"batch_wait_ms must be in 0..1000, got {self.batch_wait_ms}")

    def check_k(self, k: int, items: int) -> int:
        if k < 1:
            raise RequestProblem(422, f"k must be a positive integer, got {k}")
        if k > self.max_k:
            raise RequestProblem(422, f"k={k} is above this server's limit of {self.max_k}")
        if k > items:
            raise RequestProblem(422, f"k={k} is above the index size ({items} items)")
        return k

    def check_count(self, count: int, what: str, maximum: int) -> None:
        if count == 0:
            raise RequestProblem(422, f"the request holds no {what}")
        if count > maximum:
            raise RequestProblem(413, f"{count} {what} in one request; this server takes at most {maximum}")


def is_loopback(host: str) -> bool:
    """Only the loopback interface is private to this machine; a name other than localhost is not trusted to be."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, allow_writes: bool, insecure: bool) -> None:
    """Refuse the two ways a server ends up open to anyone, unless ``insecure`` says it is meant."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise UserError(f"the token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH}, e.g. "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if insecure or token is not None:
        return
    if not is_loopback(host):
        raise UserError(f"--host {host} is reachable from other machines and no token is set; pass --token "
                        f"(or set {TOKEN_ENVIRONMENT}), or --insecure if anyone on that network may use it")
    if allow_writes:
        raise UserError(f"--allow-writes lets callers change the index; set a token (--token or {TOKEN_ENVIRONMENT}), "
                        "or pass --insecure if every local user may write")
