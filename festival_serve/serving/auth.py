"""API keys: who may call ``/v1`` (``KeyRing``), and the ASGI middleware that asks for one (``RequireApiKey``,
which ``festival_serve.serving.http.build_http_app`` puts in front of both servers' routes). No Ray.

A keys file holds the SHA-256 hex digest of each key, one per line (``#`` starts a comment; blank
lines are fine), never a key itself: the file can be mounted on every node and read by anyone who
operates the cluster without handing out access. ``festival-serve keys new --file PATH`` makes a key,
appends its digest and shows the key once. Keys are never logged.

    # laptop of the night shift
    3f0a…e9c1  # a comment after the digest is fine too
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from festival_serve.serving.errors import error_response

logger = logging.getLogger(__name__)

#: Marks a festival-serve key, so one found in a log or a repository is recognisable (and greppable).
KEY_PREFIX = "fs_"

_DIGEST = re.compile(r"[0-9a-f]{64}")


class KeysFileError(ValueError):
    """The keys file cannot be read or has a line that is not a digest."""


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe base64 (43 characters), after ``KEY_PREFIX``."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def digest(key: str) -> str:
    """The SHA-256 hex digest of ``key``: what a keys file stores."""
    return hashlib.sha256(key.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header; None when the header is absent or not that."""
    parts = (authorization or "").split()
    if len(parts) != 2 or parts[0].lower() != "bearer":  # the scheme is case-insensitive (RFC 7235)
        return None
    return parts[1]


def read_digests(path: str | Path) -> list[str]:
    """The digests in a keys file, in order; an unreadable file or a malformed line is a ``KeysFileError``
    naming the file and line (never echoing the line: a key pasted by mistake must not reach a log)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise KeysFileError(f"API keys file {path} cannot be read: {reason}") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip().lower()
        if not value:
            continue
        if not _DIGEST.fullmatch(value):
            raise KeysFileError(
                f"{path}, line {number}: expected a SHA-256 hex digest (64 hex characters), got {len(value)} "
                "characters; add keys with `festival-serve keys new --file PATH`")
        digests.append(value)
    return digests


@dataclass(frozen=True)
class KeyRing:
    """The digests of the keys that may call ``/v1``."""

    digests: tuple[str, ...]

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyRing":
        digests = read_digests(path)
        if not digests:
            raise KeysFileError(f"API keys file {path} holds no key digests; add one with "
                                f"`festival-serve keys new --file {path}`")
        return cls(tuple(digests))

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header carries one of the keys. Every digest is compared, in
        constant time, whatever matched: the time taken says nothing about which key it was or how close."""
        key = bearer_key(authorization)
        if key is None:
            return False
        presented = digest(key).encode()
        matched = False
        for stored in self.digests:
            matched |= hmac.compare_digest(presented, stored.encode())
        return matched


class KeyFile:
    """The keys of a keys file, following the file: at most every ``reload_s`` seconds a request's check looks at
    the file (one ``stat``, microseconds) and, when its identity, size or mtime changed, reads it again. A key
    removed from the file stops working within ``reload_s``; a key added starts. A file that has become unreadable,
    malformed or empty keeps the last good keys (and says so in the log every time it is looked at), so a botched
    edit does not open or close the service by itself; ``mode_warning`` says when others may write the file."""

    def __init__(self, path: str | Path, *, reload_s: float) -> None:
        self.path, self.reload_s = Path(path), reload_s
        self.ring = KeyRing.from_file(self.path)  # the first read fails loudly: a replica must not start keyless
        self._signature = self._stat_signature()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()  # the ingress checks from its event loop; the baseline may from threads
        warning = self.mode_warning()
        if warning:
            logger.warning(warning)

    @property
    def digests(self) -> tuple[str, ...]:
        return self.ring.digests

    def allows(self, authorization: str | None) -> bool:
        self.refresh()
        return self.ring.allows(authorization)

    def refresh(self, *, now: float | None = None) -> None:
        """Read the file again if ``reload_s`` has passed since the last look and it changed."""
        now = time.monotonic() if now is None else now
        if now - self._checked_at < self.reload_s:
            return
        with self._lock:
            self._checked_at = now
            signature = self._stat_signature()
            if signature == self._signature:
                return
            try:
                ring = KeyRing.from_file(self.path)
            except KeysFileError as e:
                logger.error("%s; still using the %d key digest(s) read before", e, len(self.ring.digests))
                return  # looked at again on the next check: the signature is not taken
            self._signature = signature
            if ring.digests != self.ring.digests:
                gone, added = set(self.ring.digests) - set(ring.digests), set(ring.digests) - set(self.ring.digests)
                logger.warning("API keys file %s changed: %d key(s) revoked, %d added (%d in all)", self.path,
                               len(gone), len(added), len(ring.digests))
            self.ring = ring
            warning = self.mode_warning()
            if warning:
                logger.warning(warning)

    def mode_warning(self) -> str | None:
        """A warning when the file's mode lets its group or others write it (they could add a key of their own)."""
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"API keys file {self.path} is writable by {'others' if mode & stat.S_IWOTH else 'its group'} "
                    f"(mode {stat.S_IMODE(mode):04o}): anyone who can write it can add a key; chmod 600 or 640 it")
        return None

    def _stat_signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns


def keys_from_file(path: str | Path | None, *, reload_s: float) -> KeyFile | None:
    """The keys of ``path`` following their file, or None (no keys file: /v1 is open)."""
    return KeyFile(path, reload_s=reload_s) if path else None


#: Paths anyone who reaches the port may call, with or without a key: the load balancers' and Kubernetes' probes,
#: and the API's description.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})


class RequireApiKey:
    """ASGI middleware: with a key ring, every request but the open paths (``OPEN_PATHS``) needs
    ``Authorization: Bearer <key>`` with a key of the ring (``KeyRing.allows``); with ``keys=None`` everything passes.

    It refuses by default rather than guarding ``/v1`` alone, so a path the router reads differently
    from this check, or a route added later, is closed rather than open. A refusal is a 401 with
    ``WWW-Authenticate`` (RFC 6750) and the usual JSON error; neither the answer nor the log shows the key."""

    def __init__(self, app: ASGIApp, keys: KeyRing | KeyFile | None) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys is None or scope["type"] not in ("http", "websocket") or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization")
        if self.keys.allows(authorization):
            await self.app(scope, receive, send)
            return
        request_id = headers.get("x-request-id")
        if bearer_key(authorization) is None:
            reason, challenge = "no API key", "Bearer"
            message = "this endpoint needs an API key: send the header `Authorization: Bearer <key>`"
        else:
            reason, challenge, message = "unknown API key", 'Bearer error="invalid_token"', "the API key is not valid"
        logger.info("request %s: 401 (%s)", request_id, reason)
        if scope["type"] == "websocket":
            # A socket is refused before it is accepted: the server answers the handshake with 403 (ASGI has no
            # 401 for a handshake without the denial-response extension, which Serve's proxy does not relay).
            await send({"type": "websocket.close", "code": 1008, "reason": f"unauthorized: {reason}"})
            return
        response = error_response(401, "unauthorized", message, request_id)
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the app's router matches. Ray Serve's proxy keeps an application's route prefix in the path
    and puts it in ``root_path`` too (``/bare/healthz``, ``/bare``); the router, and so this, strips it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root + "/") else path
