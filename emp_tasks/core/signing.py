"""Standard Webhooks signatures: `whsec_` secrets and the `v1,` HMAC-SHA256 signature."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

PREFIX = "whsec_"
MIN_KEY_BYTES = 16


class InvalidSecret(ValueError):
    pass


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def key_of(secret: str) -> bytes:
    """The HMAC key: the base64-decoded part after `whsec_`."""
    if not secret.startswith(PREFIX):
        raise InvalidSecret("must start with whsec_")
    try:
        key = base64.b64decode(secret[len(PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise InvalidSecret("the part after whsec_ must be base64") from exc
    if len(key) < MIN_KEY_BYTES:
        raise InvalidSecret(f"the key must be at least {MIN_KEY_BYTES} bytes")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value for this message."""
    content = f"{message_id}.{timestamp}.{body}".encode()
    digest = hmac.new(key_of(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()
