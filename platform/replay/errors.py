"""Errors of the Arrow replay store: all derive from ``ReplayStoreError``."""

from __future__ import annotations


class ReplayStoreError(Exception):
    """A replay store cannot be opened, read or written as asked."""


class ManifestError(ReplayStoreError):
    """A manifest is missing, unreadable or fails its own checksum."""


class UnsupportedFormatError(ReplayStoreError):
    """A manifest or shard was written in a newer format version than this clgrid reads."""


class ShardError(ReplayStoreError):
    """A shard a manifest references cannot be used; names both."""

    def __init__(self, message: str, shard: str, manifest: str):
        super().__init__(message)
        self.shard = shard
        self.manifest = manifest


class ShardMissingError(ShardError):
    """A referenced shard file does not exist."""


class ShardCorruptError(ShardError):
    """A referenced shard's bytes differ from what its manifest recorded (size, checksum or schema)."""
