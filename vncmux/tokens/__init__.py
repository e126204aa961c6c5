"""
Token storage, split by concern: records and hashing (L{record}), targets (L{targets}) and
the stores (L{memory}, L{file}). The names other modules use are exported here.
"""

from __future__ import annotations

from vncmux.tokens.errors import TokenStoreUnavailable, UnsupportedOperation
from vncmux.tokens.file import (
    ISSUED_FILE_NAME,
    LOCK_FILE_NAME,
    FileTokenStore,
    loose_permissions,
)
from vncmux.tokens.memory import MemoryTokenStore
from vncmux.tokens.record import (
    TOKEN_ID_LENGTH,
    TokenRecord,
    hash_token,
    number_text,
    parse_token_value,
    token_id_of,
)
from vncmux.tokens.targets import (
    BadTarget,
    check_instance,
    check_target,
    format_target,
    parse_port,
    parse_target,
)

__all__ = [
    "ISSUED_FILE_NAME",
    "LOCK_FILE_NAME",
    "TOKEN_ID_LENGTH",
    "BadTarget",
    "FileTokenStore",
    "MemoryTokenStore",
    "TokenRecord",
    "TokenStoreUnavailable",
    "UnsupportedOperation",
    "check_instance",
    "check_target",
    "format_target",
    "hash_token",
    "loose_permissions",
    "number_text",
    "parse_port",
    "parse_target",
    "parse_token_value",
    "token_id_of",
]
