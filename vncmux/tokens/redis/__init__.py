"""
The Redis token store, by concern: the ``--tokens`` URL (L{config}), the key layout and Lua
scripts (L{scripts}), the adapters over txredisapi (L{client}), the revocation subscription
(L{subscription}) and the store itself (L{store}).
"""
