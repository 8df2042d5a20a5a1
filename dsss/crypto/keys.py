# -*- test-case-name: tests.unit.test_crypto -*-
"""The user's key pair (Curve25519, PyNaCl): generation, storage (0600, atomic), loading."""

from __future__ import annotations

import os
from pathlib import Path

from nacl.public import PrivateKey, PublicKey

from dsss.errors import LocalUsageError
from dsss.fileutil import atomic_write

HEADER = "dsss-key-v1"


class KeyFileError(LocalUsageError):
    exit_code = 2


def default_key_path() -> Path:
    env = os.environ.get("DSSS_KEY")
    if env:
        return Path(env)
    return Path.home() / ".config" / "dsss" / "key"


def generate_key_file(path: str | os.PathLike[str]) -> PrivateKey:
    """Write a new key pair to `path` (mode 0600); refuses to overwrite an existing file."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = PrivateKey.generate()
    text = (
        "# DSSS private key. Anyone holding this file can read your files: keep it secret.\n"
        f"{HEADER} {bytes(key).hex()}\n"
    )
    try:
        atomic_write(path, text.encode("ascii"), mode=0o600, exclusive=True)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from None
    return key


MAX_KEY_FILE = 4096
"""The largest file read as a key file (one is about 150 bytes)."""


def load_key_file(path: str | os.PathLike[str]) -> PrivateKey:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no key at {path}; create one with `python -m dsss.client keygen`") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a directory, not a DSSS key file") from None
    except OSError as e:
        raise KeyFileError(f"cannot read key {path}: {e.strerror or e}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is not a DSSS key file (larger than {MAX_KEY_FILE} bytes); check --key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a DSSS key file (not text); check --key") from None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) == 2 and words[0] == HEADER:
            try:
                raw = bytes.fromhex(words[1])
            except ValueError:
                break
            if len(raw) == 32:
                return PrivateKey(raw)
        break
    raise KeyFileError(f"{path} is not a DSSS key file; check --key")


def public_key_hex(key: PrivateKey | PublicKey) -> str:
    pk = key.public_key if isinstance(key, PrivateKey) else key
    return bytes(pk).hex()


def parse_public_key(text: str) -> PublicKey:
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise LocalUsageError("a public key is 64 hex characters")
    return PublicKey(raw)
