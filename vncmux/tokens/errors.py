"""The two failures every token store reports, whatever keeps its tokens."""

from __future__ import annotations


class TokenStoreUnavailable(Exception):
    """The token store did not answer (down, too slow, or answered garbage)."""


class UnsupportedOperation(ValueError):
    """The store cannot do this (e.g. a token file cannot keep a TTL or an instance)."""
