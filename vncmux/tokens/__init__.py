"""
Token storage, split by concern: records and hashing (L{record}), targets (L{targets}), the
stores (L{memory}, L{file}, L{redis}, and nova's in L{vncmux.novadb}) and
L{open_token_store}, which picks one for ``--tokens``. The names other modules use are
exported here.
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
from vncmux.tokens.open import NOVA_SOURCE_PREFIX, open_token_store
from vncmux.tokens.record import (
    TOKEN_ID_LENGTH,
    TokenRecord,
    hash_token,
    number_text,
    parse_token_value,
    token_id_of,
)
from vncmux.tokens.redis.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_REPLY_TIMEOUT,
    RedisConfig,
)
from vncmux.tokens.redis.scripts import (
    INSTANCE_KEY_PREFIX,
    REVOKE_CHANNEL,
    TOKEN_KEY_PREFIX,
    instance_key,
    token_key,
)
from vncmux.tokens.redis.store import GuardSet, RedisTokenStore
from vncmux.tokens.targets import (
    BadTarget,
    check_instance,
    check_target,
    format_target,
    parse_port,
    parse_target,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_REPLY_TIMEOUT",
    "INSTANCE_KEY_PREFIX",
    "ISSUED_FILE_NAME",
    "LOCK_FILE_NAME",
    "NOVA_SOURCE_PREFIX",
    "REVOKE_CHANNEL",
    "TOKEN_ID_LENGTH",
    "TOKEN_KEY_PREFIX",
    "BadTarget",
    "FileTokenStore",
    "GuardSet",
    "MemoryTokenStore",
    "RedisConfig",
    "RedisTokenStore",
    "TokenRecord",
    "TokenStoreUnavailable",
    "UnsupportedOperation",
    "check_instance",
    "check_target",
    "format_target",
    "hash_token",
    "instance_key",
    "loose_permissions",
    "number_text",
    "parse_port",
    "parse_target",
    "open_token_store",
    "parse_token_value",
    "token_id_of",
    "token_key",
]
