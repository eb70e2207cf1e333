"""Encryption at rest: AES-256-GCM per file, keys from the environment only.

Why AES-GCM (via `cryptography`, never home-made): it is authenticated, so a wrong key, a flipped bit
or a file swapped for another all fail loudly at decrypt time instead of yielding garbage weights.

Blob layout: `MAGIC (8 bytes) | nonce (12 bytes, fresh from os.urandom per call) | ciphertext+tag`.
The caller passes associated data (`aad`), e.g. the file's name inside its folder, which is
authenticated but not stored: a blob moved under another name no longer decrypts.

Keys come from `HPCML_KEY_FILE` (a file of mode 0600 or stricter) or `HPCML_KEY` (hex or base64),
never from CLI arguments, and no message here ever contains key material. `cryptography` is an
optional extra (`hpcml[crypto]`), imported only when a key is actually used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from hpcml.errors import HpcmlError, UsageError

__all__ = ["KEY_BYTES", "decrypt_bytes", "encrypt_bytes", "is_encrypted", "key_from_env", "key_id", "mac"]

KEY_BYTES = 32
MAGIC = b"HPCMLAE1"
_NONCE = 12
_TAG = 16


def _aesgcm(key: bytes):
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise UsageError(f"an encryption key must be {KEY_BYTES} bytes (AES-256)")
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise UsageError("encryption needs the `cryptography` package: pip install 'hpcml[crypto]'") from None
    return AESGCM(bytes(key))


def is_encrypted(blob: bytes) -> bool:
    return blob[: len(MAGIC)] == MAGIC


def encrypt_bytes(data: bytes, key: bytes, *, aad: bytes) -> bytes:
    """Encrypt and authenticate `data`; `aad` (e.g. the file name) must be given again to decrypt."""
    nonce = os.urandom(_NONCE)
    return MAGIC + nonce + _aesgcm(key).encrypt(nonce, bytes(data), aad)


def decrypt_bytes(blob: bytes, key: bytes, *, aad: bytes, name: str) -> bytes:
    """Decrypt a blob from `encrypt_bytes`. Any failure raises HpcmlError naming `name` (a path).

    GCM cannot tell a wrong key from a modified file; callers that can (see `key_id`) should check
    the key first to give the more precise message.
    """
    from cryptography.exceptions import InvalidTag

    aes = _aesgcm(key)
    if not is_encrypted(blob):
        raise HpcmlError(f"{name}: not an hpcml-encrypted file (missing header)")
    if len(blob) < len(MAGIC) + _NONCE + _TAG:
        raise HpcmlError(f"{name}: encrypted file is truncated ({len(blob)} bytes)")
    nonce, body = blob[len(MAGIC) : len(MAGIC) + _NONCE], blob[len(MAGIC) + _NONCE :]
    try:
        return aes.decrypt(nonce, body, aad)
    except InvalidTag:
        raise HpcmlError(
            f"{name}: decryption failed (authentication tag mismatch): wrong key, or the file was "
            "modified, corrupted, or moved from another name or checkpoint"
        ) from None


def _subkey(key: bytes, purpose: str) -> bytes:
    """A key for one purpose derived from the master key, so the AES key is never reused for HMAC."""
    return hmac.new(bytes(key), b"hpcml subkey: " + purpose.encode(), hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """A public fingerprint of the key (a PRF output; reveals nothing about the key itself).

    Stored next to encrypted data so that a wrong key is reported as such instead of as tampering.
    """
    return _subkey(key, "key id")[:8].hex()


def mac(key: bytes, data: bytes, *, purpose: str) -> str:
    """HMAC-SHA256 of `data` under a subkey derived for `purpose`, as hex."""
    return hmac.new(_subkey(key, purpose), data, hashlib.sha256).hexdigest()


def _parse_key(raw: bytes, source: str) -> bytes:
    """Accept 32 raw bytes, 64 hex characters, or base64 of 32 bytes. Never echo the value."""
    if len(raw) == KEY_BYTES and source.startswith("file"):
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) == KEY_BYTES:
        return key
    raise UsageError(
        f"{source}: not a {KEY_BYTES}-byte key; expected {2 * KEY_BYTES} hex characters or base64 of "
        f"{KEY_BYTES} bytes (make one with: python -c 'import os; print(os.urandom(32).hex())')"
    )


def key_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The encryption key from `HPCML_KEY_FILE` or `HPCML_KEY`, or None when neither is set.

    The key file must not be readable by group or others (mode 0600 or 0400): a world-readable key
    protects nothing, so it is refused rather than used.
    """
    env = os.environ if environ is None else environ
    path, value = env.get("HPCML_KEY_FILE"), env.get("HPCML_KEY")
    if path and value:
        raise UsageError("both HPCML_KEY_FILE and HPCML_KEY are set; set only one")
    if path:
        p = Path(path)
        try:
            mode = stat.S_IMODE(p.stat().st_mode)
            if mode & 0o077:
                raise UsageError(
                    f"HPCML_KEY_FILE {p}: mode {mode:04o} lets other users read the key; "
                    f"run `chmod 600 {p}` (hpcml refuses keys that are not private)"
                )
            raw = p.read_bytes()
        except OSError as err:
            raise UsageError(f"HPCML_KEY_FILE {p}: cannot read ({os.strerror(err.errno or 0)})") from None
        key = _parse_key(raw, f"file HPCML_KEY_FILE {p}")
    elif value:
        key = _parse_key(value.encode(), "HPCML_KEY")
    else:
        return None
    _aesgcm(key)  # a key without the cipher package fails now, not at the first checkpoint
    return key
