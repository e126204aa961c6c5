"""
The token file store (websockify's TokenFile format): change detection by stat signature,
and ``vncmux token`` writes under a lock file, with atomic rewrites that keep the file's mode
and owner.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from vncmux.interfaces import ITokenAdmin, ITokenStore
from vncmux.tokens.errors import TokenStoreUnavailable, UnsupportedOperation
from vncmux.tokens.record import TokenRecord, hash_token
from vncmux.tokens.targets import BadTarget, format_target, parse_target

#: The file that ``issue`` appends to when a FileTokenStore reads a directory.
ISSUED_FILE_NAME = "vncmux-issued.tokens"
#: The lock file that ``issue`` and ``revoke`` hold, inside a token directory; next to a token
#: file it is ``.<file name>.lock``. A dot file, so a directory scan never reads it.
LOCK_FILE_NAME = ".vncmux-tokens.lock"

# (device, inode, size, mtime_ns, ctime_ns): a file is parsed again only when this changes.
_FileSignature = tuple[int, int, int, int, int]
_NEVER_MATCHES: _FileSignature = (-1, -1, -1, -1, -1)
# An edit within the same filesystem timestamp tick as the parse, without a size change,
# leaves the signature unchanged; a file modified this recently is parsed again at the next
# check until it has aged (git's "racy" index entries, same cure).
_RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> _FileSignature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _ParsedFile:
    signature: _FileSignature
    records: dict[str, TokenRecord]


def _token_problem(token: str) -> str | None:
    """
    Why C{token} cannot be written as a token-file line, or C{None}. The reader splits a line
    at its first ``:``, skips lines starting with ``#`` and trims whitespace, so a token
    with any of those would be read back as another token or not at all.
    """
    if not token:
        return "must not be empty"
    if ":" in token:
        return "must not contain ':'"
    if token.startswith("#"):
        return "must not start with '#'"
    if any(c.isspace() for c in token):
        return "must not contain whitespace"
    return None


def _split_token_line(line: str) -> tuple[str, str] | None:
    """
    ``token: target`` from one stripped line of a token file, or C{None} when the line has
    no usable token. websockify splits on ``": "``; the space is optional here.
    """
    token, sep, target = line.partition(":")
    token = token.strip()
    if not sep or not token or any(c.isspace() for c in token):
        return None
    return token, target


@implementer(ITokenStore, ITokenAdmin)
class FileTokenStore:
    """
    websockify's TokenFile format: a file, or a directory of files, of ``token: host:port``
    lines (``[v6addr]:port`` allowed, ``#`` comments and blank lines skipped).

    Edits are picked up without a restart, but a file is parsed again only when its stat
    signature (inode, size, mtime, ctime) or the directory listing changed, and that is
    checked at most once per C{check_interval} seconds of C{clock}: a lookup costs a dict
    access, not a file read. (A file modified in the last 2 s of C{clock} is parsed at every
    check, since a same-size edit in the same timestamp tick would not change its signature.)
    Only token hashes are kept in memory. Dot files and names
    ending in ``~`` in a directory are ignored (editor swap and backup files).

    As an L{ITokenAdmin} it appends ``token: host:port`` lines and removes them again; a
    file has no room for a TTL, an instance, a password, limits or a console type other
    than noVNC (its tokens are noVNC consoles), so such records are
    refused with L{UnsupportedOperation}. Both hold an exclusive C{flock} on a lock file
    (L{LOCK_FILE_NAME}) so that two ``vncmux token`` calls cannot interleave; a new token
    file is created with mode 0600, and a revoke keeps the file's mode and owner.
    """

    _log = Logger()

    def __init__(
        self, path: str | os.PathLike[str], clock: IReactorTime, check_interval: float = 1.0
    ) -> None:
        self.path = os.path.abspath(path)  # a later chdir (daemonizing) must not move it
        self._clock = clock
        self._check_interval = check_interval
        self._checked_at: float | None = None
        self._files: dict[str, _ParsedFile] = {}
        self._records: dict[str, TokenRecord] = {}
        self._error: TokenStoreUnavailable | None = None
        self._listing: list[str] = []
        self._unreadable: dict[str, _FileSignature] = {}
        #: How many times a file was opened to be parsed (readable or not): lets tests prove
        #: that unchanged files are not read again.
        self.parse_count = 0
        self._permission_warnings: set[str] = set()

    # ITokenStore

    def lookup(self, token: str) -> Deferred[TokenRecord | None]:
        try:
            self._refresh()
        except TokenStoreUnavailable as e:
            return fail(e)
        return succeed(self._records.get(hash_token(token)))

    def ping(self) -> Deferred[None]:
        """Check the file(s) now, ignoring C{check_interval}."""
        self._checked_at = None
        try:
            self._refresh()
        except TokenStoreUnavailable as e:
            return fail(e)
        return succeed(None)

    # ITokenAdmin

    def issue(self, record: TokenRecord, token: str) -> Deferred[None]:
        unsupported = [
            name
            for name, value in (
                ("expires_at (--ttl)", record.expires_at),
                ("instance_uuid", record.instance_uuid),
                ("max_sessions", record.max_sessions),
                ("single_use", record.single_use),
                ("password", record.password),
                ("console_type", record.console_type != "novnc"),
            )
            if value
        ]
        if unsupported:
            return fail(
                UnsupportedOperation(
                    "a token file holds only `token: host:port` lines and cannot keep "
                    + ", ".join(unsupported)
                    + "; use a redis:// token store for that"
                )
            )
        problem = _token_problem(token)
        if problem is not None:
            return fail(ValueError(f"a token for a token file {problem}"))
        target = self._issue_path()
        line = f"{token}: {format_target(record.host, record.port)}\n"
        try:
            with self._locked():
                self._append_line(target, line)
        except TokenStoreUnavailable as e:
            return fail(e)
        except OSError as e:
            return fail(TokenStoreUnavailable(f"cannot write token file {target}: {e.strerror}"))
        self._checked_at = None
        return succeed(None)

    def revoke(self, token_hash: str) -> Deferred[bool]:
        """Remove every line of the token from every file (rewritten atomically)."""
        try:
            with self._locked():
                self._checked_at = None
                self._refresh()
                removed = False
                for path in list(self._files):
                    removed = self._remove_lines(path, token_hash) or removed
        except TokenStoreUnavailable as e:
            return fail(e)
        except OSError as e:
            return fail(TokenStoreUnavailable(f"cannot rewrite token file: {e.strerror}"))
        self._checked_at = None
        return succeed(removed)

    def revoke_instance(self, instance_uuid: str) -> Deferred[int]:
        return fail(
            UnsupportedOperation("a token file has no instances; use a redis:// token store")
        )

    def permission_problems(self) -> list[str]:
        """L{loose_permissions} of the file that L{issue} writes (and of its directory)."""
        return loose_permissions(self._issue_path())

    # internals

    def _warn_permissions(self, path: str) -> None:
        """Log each loose permission of a parsed file or its directory once (per mode)."""
        for problem in loose_permissions(path):
            if problem not in self._permission_warnings:
                self._permission_warnings.add(problem)
                self._log.warn("{problem}", problem=problem)

    def _issue_path(self) -> str:
        if os.path.isdir(self.path):
            return os.path.join(self.path, ISSUED_FILE_NAME)
        return self.path

    def _lock_path(self) -> str:
        if os.path.isdir(self.path):
            return os.path.join(self.path, LOCK_FILE_NAME)
        directory, name = os.path.split(self.path)
        return os.path.join(directory, f".{name}.lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """
        Hold the store's lock file: an append (issue) landing between the read and the
        replace of a revoke would be lost, and a revoke's replace could bring back a line
        that another revoke just removed. Opened read-only (all C{flock} needs), so a lock
        file that root created is still usable by the proxy's own user; never through a
        symbolic link (a planted link would make ``sudo vncmux token`` create a file anywhere).
        """
        path = self._lock_path()
        fd = _open_no_follow(path, os.O_RDONLY | os.O_CREAT, 0o644, "lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _refresh(self) -> None:
        now = self._clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self._check_interval:
            if self._error is not None:
                raise self._error
            return
        self._checked_at = now
        try:
            self._rescan(now)
        except TokenStoreUnavailable as e:
            if self._error is None or str(self._error) != str(e):
                self._log.warn("token store unavailable: {why}", why=str(e))
            self._error = e
            raise
        except Exception as e:  # never let a surprise break the lookup path
            self._log.failure("token file {path}: unexpected error", path=self.path)
            self._error = TokenStoreUnavailable(f"token file {self.path}: {e.__class__.__name__}")
            raise self._error from None
        if self._error is not None:
            self._log.info("token file {path} is readable again", path=self.path)
        self._error = None

    def _rescan(self, now: float) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise TokenStoreUnavailable(f"token file {self.path} does not exist") from None
        except OSError as e:
            raise TokenStoreUnavailable(f"token file {self.path}: {e.strerror}") from None
        is_directory = stat.S_ISDIR(st.st_mode)
        candidates = self._list_directory() if is_directory else [(self.path, st)]
        listing = [path for path, _ in candidates]
        files: dict[str, _ParsedFile] = {}
        changed = listing != self._listing
        for path, file_st in candidates:
            signature = _signature(file_st)
            known = self._files.get(path)
            if known is not None and known.signature == signature:
                files[path] = known
                continue
            if self._unreadable.get(path) == signature:
                continue  # still the same unreadable file: not opened again until it changes
            if 0 <= now - file_st.st_mtime < _RACY_SECONDS:
                signature = _NEVER_MATCHES
            parsed = self._parse(path, signature, single=path == self.path)
            if parsed is not None:
                files[path] = parsed
                self._unreadable.pop(path, None)
            changed = changed or parsed is not None or known is not None
        if changed:
            records: dict[str, TokenRecord] = {}
            for parsed in files.values():
                records.update(parsed.records)
            self._records = records
        self._files = files
        self._listing = listing
        present = set(listing)
        self._unreadable = {p: sig for p, sig in self._unreadable.items() if p in present}

    def _list_directory(self) -> list[tuple[str, os.stat_result]]:
        try:
            entries = sorted(os.scandir(self.path), key=lambda e: e.name)
        except OSError as e:
            raise TokenStoreUnavailable(f"token directory {self.path}: {e.strerror}") from None
        found = []
        for entry in entries:
            if entry.name.startswith(".") or entry.name.endswith("~"):
                continue
            try:
                if entry.is_file():
                    found.append((entry.path, entry.stat()))
            except OSError:
                continue  # removed between the listing and the stat
        return found

    def _parse(self, path: str, signature: _FileSignature, single: bool) -> _ParsedFile | None:
        self.parse_count += 1
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            if single:
                raise TokenStoreUnavailable(f"token file {path}: {e.strerror}") from None
            if path not in self._unreadable:
                self._log.warn("token file {path} skipped: {why}", path=path, why=e.strerror)
            self._unreadable[path] = signature
            return None
        self._warn_permissions(path)
        records: dict[str, TokenRecord] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            split = _split_token_line(line)
            if split is None:
                self._warn_line(path, number, "expected `token: host:port`")
                continue
            token, target = split
            try:
                host, port = parse_target(target)
            except BadTarget:
                self._warn_line(path, number, "the target is not host:port or [v6addr]:port")
                continue
            token_hash = hash_token(token)
            records[token_hash] = TokenRecord(token_hash=token_hash, host=host, port=port)
        return _ParsedFile(signature, records)

    def _warn_line(self, path: str, number: int, problem: str) -> None:
        # Never the line itself: a malformed line may be nothing but a token.
        self._log.warn(
            "token file {path}:{line}: malformed line skipped ({problem})",
            path=path,
            line=number,
            problem=problem,
        )

    @staticmethod
    def _append_line(path: str, line: str) -> None:
        """
        Append C{line} to a token file, after a newline if the file does not end with one. A new
        file is created with mode 0600 (tokens are secrets; the umask would make it world
        readable) and given to the owner of its directory, so a file that ``sudo vncmux token
        add`` creates in the proxy's directory stays readable by the proxy. A symbolic link is
        refused, not followed: run as root, following it would append to any file.
        """
        flags = os.O_RDWR | os.O_APPEND
        try:
            fd = _open_no_follow(path, flags | os.O_CREAT | os.O_EXCL, 0o600, "token file")
        except FileExistsError:  # O_EXCL: also a symbolic link, which the next open refuses
            fd = _open_no_follow(path, flags, 0, "token file")
        else:
            _give_to(fd, os.stat(os.path.dirname(path) or "."))
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            data = line.encode("utf-8")
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)

    def _remove_lines(self, path: str, token_hash: str) -> bool:
        fd = _open_no_follow(path, os.O_RDONLY, 0, "token file")
        with open(fd, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.readlines()
            st = os.fstat(f.fileno())
        kept = []
        for raw in lines:
            line = raw.strip()
            split = None if line.startswith("#") else _split_token_line(line)
            if split is not None and hash_token(split[0]) == token_hash:
                continue
            kept.append(raw)
        if len(kept) == len(lines):
            return False
        directory = os.path.dirname(os.path.abspath(path))
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".vncmux-tokens-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                f.writelines(kept)
                # `sudo vncmux token revoke` must not leave a root-owned file that the
                # proxy's user cannot read (every console would fail with 4503).
                _give_to(f.fileno(), st)
            os.chmod(temporary, stat.S_IMODE(st.st_mode))
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        return True


def _open_no_follow(path: str, flags: int, mode: int, what: str) -> int:
    """
    C{os.open} that refuses a symbolic link as the last component (C{O_NOFOLLOW}), with an
    error that says so; other OS errors propagate as they are.
    """
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise TokenStoreUnavailable(
                f"{what} {path} is a symbolic link: refused (vncmux writes no file through"
                " a link; point --tokens at the real file)"
            ) from None
        if isinstance(e, FileExistsError):
            raise
        raise TokenStoreUnavailable(f"cannot open {what} {path}: {e.strerror}") from None


def loose_permissions(path: str) -> list[str]:
    """
    Why the token file (or token directory) C{path}, or the directory holding it, lets
    others than its owner change which consoles tokens open: one sentence per group- or
    world-writable one. A missing path has no problems.
    """
    problems = []
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        writable = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH))
                    if st.st_mode & bit]  # fmt: skip
        if writable and not (candidate != path and sticky):
            problems.append(
                f"token {kind} {candidate} is writable by {' and '.join(writable)}"
                f" (mode {stat.S_IMODE(st.st_mode):04o}): they can add consoles; chmod go-w"
            )
    return problems


def _give_to(fd: int, owner: os.stat_result) -> None:
    """C{fchown} to C{owner}'s uid and gid, as far as we may (only root can give a file away)."""
    with suppress(PermissionError):
        os.fchown(fd, owner.st_uid, owner.st_gid)
