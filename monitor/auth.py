"""Bearer tokens for the API's write endpoints and incident actions.

The config stores only SHA-256 digests of the tokens. A token is 32 random
bytes, so a plain SHA-256 is enough; a slow password hash would only slow
every request. Digests are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Sequence

TOKEN_PREFIX = "pw_"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses; a host name other than localhost is not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generate_token() -> str:
    """Return a new random bearer token (43 URL-safe characters after the prefix)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Return the SHA-256 hex digest under which ``token`` is configured."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenVerifier:
    """Checks ``Authorization: Bearer`` headers against the configured digests.

    ``required`` is False only on a loopback bind without configured tokens.
    """

    def __init__(self, digests: Sequence[str], *, required: bool) -> None:
        self._digests = [bytes.fromhex(digest) for digest in digests]
        self.required = required

    @classmethod
    def for_server(cls, host: str, digests: Sequence[str]) -> TokenVerifier:
        return cls(digests, required=bool(digests) or not is_loopback(host))

    def accepts(self, token: str | None) -> bool:
        """True when no token is required, or ``token`` matches a configured digest."""
        if not self.required:
            return True
        if not token:
            return False
        presented = hashlib.sha256(token.encode()).digest()
        # Compare against every digest, so the time taken does not reveal which one matched.
        matches = [hmac.compare_digest(presented, digest) for digest in self._digests]
        return any(matches)
