"""Bearer tokens, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def _digest(token: str | bytes) -> bytes:
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


class BearerTokens:
    """The tokens an API process accepts. Only their SHA-256 digests are kept, and a
    presented token is compared, digest to digest with `hmac.compare_digest`, against every
    one of them (no early exit): the time taken tells neither how much of a token matched
    nor which one, nor its length. The tokens themselves are never logged nor shown."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = [_digest(token) for token in tokens]
        if not self._digests:
            raise ValueError("no tokens")

    def __repr__(self) -> str:
        return f"BearerTokens({len(self._digests)} tokens)"

    def accepts(self, authorization: str | None) -> bool:
        """True if `authorization` (the header's value) is `Bearer <an accepted token>`."""
        if authorization is None:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = _digest(token.strip())
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found
