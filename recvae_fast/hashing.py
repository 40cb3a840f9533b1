"""The package's one hash: SHA-256 fed a sequence of byte strings, each as it is or after its
length. Run folders and tuning studies store these digests (split.npz's ids hash, run.json's
split fingerprint, the checkpoint's data fingerprint), so how each caller frames its bytes is part
of the file format: tests/test_stored_hashes.py pins the values."""
from __future__ import annotations

import hashlib


class Digest:
    """SHA-256 over the parts given to `raw` and `sized`, in order (both return the digest, so
    calls chain)."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def raw(self, data: bytes) -> "Digest":
        """The bytes as they are (the caller separates parts itself)."""
        self._sha.update(data)
        return self

    def sized(self, data: bytes, size: int | None = None) -> "Digest":
        """The bytes after their size as 8 little-endian bytes: len(data), or `size` when given
        (an array's element count), so that no two sequences of parts hash alike."""
        self._sha.update((len(data) if size is None else size).to_bytes(8, "little"))
        self._sha.update(data)
        return self

    def hexdigest(self) -> str:
        """The 64 hex digits (callers that store a short fingerprint keep a prefix)."""
        return self._sha.hexdigest()
