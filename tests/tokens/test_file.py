"""
FileTokenStore: websockify's TokenFile format, change detection, locking, links and
permissions.
"""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Any
from unittest import SkipTest

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.tokens.support import OTHER, TOKEN, log_messages, make_record, unprivileged
from vncmux.tokens import (
    ISSUED_FILE_NAME,
    LOCK_FILE_NAME,
    FileTokenStore,
    TokenStoreUnavailable,
    hash_token,
)


class FileTokenStoreTests(SynchronousTestCase):
    """websockify's TokenFile format, change detection and the admin side of a token file."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def write(self, path: str, text: str) -> str:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def target(self, store: FileTokenStore, token: str) -> str | None:
        record = self.successResultOf(store.lookup(token))
        return None if record is None else record.target

    def test_missing_file(self) -> None:
        """A missing file is TokenStoreUnavailable naming the path, for lookup and ping."""
        path = self.mktemp()
        store = FileTokenStore(path, self.clock)
        failure = self.failureResultOf(store.lookup(TOKEN), TokenStoreUnavailable)
        self.assertIn(path, str(failure.value))
        self.assertIn("does not exist", str(failure.value))
        self.failureResultOf(store.ping(), TokenStoreUnavailable)
        self.write(path, f"{TOKEN}: h:1\n")
        self.assertIsNone(self.successResultOf(store.ping()))
        self.assertEqual(self.target(store, TOKEN), "h:1")

    def test_format(self) -> None:
        """Comments and blank lines are skipped; IPv6 in brackets; the space is optional."""
        path = self.write(
            self.mktemp(),
            "# a comment\n\n   \n"
            "plain: 10.0.0.1:5900\n"
            "  v6: [fd00::7]:5901  \n"
            "nospace:host.example:5902\n"
            "# commented: 1.2.3.4:5\n",
        )
        store = FileTokenStore(path, self.clock)
        self.assertEqual(self.target(store, "plain"), "10.0.0.1:5900")
        self.assertEqual(self.target(store, "v6"), "[fd00::7]:5901")
        self.assertEqual(self.target(store, "nospace"), "host.example:5902")
        self.assertIsNone(self.target(store, "# commented"))
        self.assertEqual(log_messages(self.log), [])

    def test_only_hashes_in_memory(self) -> None:
        """The store keeps token hashes, not tokens."""
        path = self.write(self.mktemp(), f"{TOKEN}: h:1\n")
        store = FileTokenStore(path, self.clock)
        self.assertEqual(self.target(store, TOKEN), "h:1")
        self.assertNotIn(TOKEN, repr(vars(store)))
        self.assertIn(hash_token(TOKEN), repr(vars(store)))

    def test_not_reparsed_when_unchanged(self) -> None:
        """Lookups stat the file at most once per interval and parse it only after a change."""
        path = self.write(self.mktemp(), "a: h:1\n")
        store = FileTokenStore(path, self.clock, check_interval=1.0)
        for _ in range(5):
            self.clock.advance(1.5)
            self.assertEqual(self.target(store, "a"), "h:1")
        self.assertEqual(store.parse_count, 1)
        self.write(path, "a: other:2\n")
        self.assertEqual(self.target(store, "a"), "h:1", "checked again only after the interval")
        self.clock.advance(1.0)
        self.assertEqual(self.target(store, "a"), "other:2")
        self.assertEqual(store.parse_count, 2)

    def test_same_size_edit(self) -> None:
        """An edit keeping the size is seen through mtime."""
        path = self.write(self.mktemp(), "a: h:1\n")
        os.utime(path, ns=(10**18, 10**18))
        store = FileTokenStore(path, self.clock, check_interval=0)
        self.assertEqual(self.target(store, "a"), "h:1")
        self.write(path, "a: h:2\n")
        os.utime(path, ns=(10**18 + 1, 10**18 + 1))
        self.assertEqual(self.target(store, "a"), "h:2")

    def test_recently_modified_file_is_reparsed(self) -> None:
        """A file modified in the last 2 s is parsed at every check, then cached."""
        path = self.write(self.mktemp(), "a: h:1\n")
        mtime = os.stat(path).st_mtime
        self.clock.advance(mtime + 0.5)
        store = FileTokenStore(path, self.clock, check_interval=0)
        self.target(store, "a")
        self.target(store, "a")
        self.assertEqual(store.parse_count, 2)
        self.clock.advance(2.0)
        self.target(store, "a")
        self.target(store, "a")
        self.target(store, "a")
        self.assertEqual(store.parse_count, 3)

    def test_directory(self) -> None:
        """A directory's files are merged; new, changed and removed files are picked up."""
        directory = self.mktemp()
        os.mkdir(directory)
        one = self.write(os.path.join(directory, "one"), "a: h:1\n")
        self.write(os.path.join(directory, "two"), "b: h:2\n")
        self.write(os.path.join(directory, ".one.swp"), "hidden: h:3\n")
        self.write(os.path.join(directory, "one~"), "backup: h:4\n")
        os.mkdir(os.path.join(directory, "subdir"))
        store = FileTokenStore(directory, self.clock)
        self.assertEqual((self.target(store, "a"), self.target(store, "b")), ("h:1", "h:2"))
        self.assertIsNone(self.target(store, "hidden"))
        self.assertIsNone(self.target(store, "backup"))
        self.assertEqual(store.parse_count, 2)

        self.write(os.path.join(directory, "three"), "c: h:5\n")
        self.clock.advance(1)
        self.assertEqual(self.target(store, "c"), "h:5")
        self.assertEqual(store.parse_count, 3, "only the new file was parsed")

        os.unlink(one)
        self.clock.advance(1)
        self.assertIsNone(self.target(store, "a"))
        self.assertEqual(self.target(store, "b"), "h:2")
        self.assertEqual(store.parse_count, 3)

    def test_malformed_lines(self) -> None:
        """Malformed lines are skipped with one warning each naming file:line, never the token."""
        path = self.write(
            self.mktemp(),
            "lonely-secret-token\n"
            "secret-one: not-a-target\n"
            "secret-two: [fd00::1:5900\n"
            ": 1.2.3.4:5900\n"
            "secret three: h:1\n"
            "good: h:9\n",
        )
        store = FileTokenStore(path, self.clock)
        self.assertEqual(self.target(store, "good"), "h:9")
        self.target(store, "good")
        messages = log_messages(self.log)
        self.assertEqual(len(messages), 5)
        for number, message in zip(range(1, 6), messages, strict=True):
            self.assertIn(f"{path}:{number}:", message)
        for secret in ("lonely", "secret", "not-a-target", "fd00"):
            self.assertFalse([m for m in messages if secret in m.replace(path, "")], secret)

    def test_issue_and_revoke_edit_the_file(self) -> None:
        """Issue appends a line; revoke removes it and keeps every other line and the mode."""
        path = self.write(self.mktemp(), "# header\nkeep: h:1")
        os.chmod(path, 0o640)
        store = FileTokenStore(path, self.clock)
        self.successResultOf(store.issue(make_record(TOKEN, host="fd00::2", port=5901), TOKEN))
        with open(path) as f:
            self.assertEqual(f.read(), f"# header\nkeep: h:1\n{TOKEN}: [fd00::2]:5901\n")
        self.assertEqual(self.target(store, TOKEN), "[fd00::2]:5901")
        self.assertIs(self.successResultOf(store.revoke(hash_token(TOKEN))), True)
        with open(path) as f:
            self.assertEqual(f.read(), "# header\nkeep: h:1\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
        self.assertIsNone(self.target(store, TOKEN))

    def test_issue_into_directory(self) -> None:
        """In directory mode, issued tokens go to their own file."""
        directory = self.mktemp()
        os.mkdir(directory)
        store = FileTokenStore(directory, self.clock)
        self.successResultOf(store.issue(make_record(TOKEN), TOKEN))
        self.assertTrue(os.path.exists(os.path.join(directory, ISSUED_FILE_NAME)))
        self.assertEqual(self.target(store, TOKEN), "10.0.0.5:5900")

    def test_issue_rejects_unstorable_tokens(self) -> None:
        """A token that would break the line format is refused."""
        store = FileTokenStore(self.write(self.mktemp(), ""), self.clock)
        for bad in ["with space", "with\ttab", "with:colon", "#comment", ""]:
            self.failureResultOf(store.issue(make_record(bad), bad), ValueError)
        self.successResultOf(store.issue(make_record("a#b-ok"), "a#b-ok"))

    def test_new_token_file_is_private(self) -> None:
        """A token file that issue creates has mode 0600 whatever the umask."""
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        path = self.mktemp()
        self.successResultOf(FileTokenStore(path, self.clock).issue(make_record(TOKEN), TOKEN))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        directory = self.mktemp()
        os.mkdir(directory)
        self.successResultOf(FileTokenStore(directory, self.clock).issue(make_record(TOKEN), TOKEN))
        issued = os.stat(os.path.join(directory, ISSUED_FILE_NAME))
        self.assertEqual(stat.S_IMODE(issued.st_mode), 0o600)

    def test_owner_kept(self) -> None:
        """
        ``sudo vncmux token revoke`` keeps the file's owner (the proxy must still read it),
        and a file that root creates in a directory belongs to the directory's owner.
        """
        if os.geteuid() != 0:
            if os.environ.get("CI"):
                self.fail("CI runs as root; this test needs root to change owners")
            raise SkipTest("only root can give a file to another user")
        path = self.write(self.mktemp(), f"{TOKEN}: h:1\nkeep: h:2\n")
        os.chown(path, 4321, 4322)
        self.assertIs(
            self.successResultOf(FileTokenStore(path, self.clock).revoke(hash_token(TOKEN))), True
        )
        st = os.stat(path)
        self.assertEqual((st.st_uid, st.st_gid), (4321, 4322))
        directory = self.mktemp()
        os.mkdir(directory)
        os.chown(directory, 4321, 4322)
        self.successResultOf(FileTokenStore(directory, self.clock).issue(make_record(TOKEN), TOKEN))
        st = os.stat(os.path.join(directory, ISSUED_FILE_NAME))
        self.assertEqual((st.st_uid, st.st_gid), (4321, 4322))

    def test_edits_hold_the_lock(self) -> None:
        """
        issue appends and revoke reads and replaces only while holding the store's lock file,
        so two ``vncmux token`` calls cannot interleave (an appended token lost by a revoke's
        replace, or a revoked one brought back).
        """
        path = self.write(self.mktemp(), f"{OTHER}: h:1\n")
        directory, name = os.path.split(path)
        store = _LockProbingStore(path, self.clock, os.path.join(directory, f".{name}.lock"))
        self.successResultOf(store.issue(make_record(TOKEN), TOKEN))
        self.assertIs(self.successResultOf(store.revoke(hash_token(OTHER))), True)
        self.assertEqual(store.held, [True, True])

        directory = self.mktemp()
        os.mkdir(directory)
        store = _LockProbingStore(directory, self.clock, os.path.join(directory, LOCK_FILE_NAME))
        self.successResultOf(store.issue(make_record(TOKEN), TOKEN))
        self.assertIs(self.successResultOf(store.revoke(hash_token(TOKEN))), True)
        self.assertEqual(store.held, [True, True])
        self.assertIsNone(self.target(store, TOKEN))

    def test_unreadable_file_in_directory(self) -> None:
        """
        An unreadable file in a token directory is skipped with one warning and not opened
        again until it changes; the other files keep working, and it is read once readable.
        """
        directory = self.mktemp()
        os.chmod(os.path.dirname(directory), 0o755)  # mktemp's own directory is 0700
        os.mkdir(directory, 0o755)
        self.write(os.path.join(directory, "good"), "a: h:1\n")
        locked = self.write(os.path.join(directory, "locked"), "b: h:2\n")
        os.chmod(locked, 0)
        store = FileTokenStore(directory, self.clock)
        with unprivileged():
            for _ in range(5):
                self.assertEqual(self.target(store, "a"), "h:1")
                self.clock.advance(1)
            self.assertIsNone(self.target(store, "b"))
        self.assertEqual(store.parse_count, 2, "each file was opened once")
        self.assertEqual(len([m for m in log_messages(self.log) if "skipped" in m]), 1)
        os.chmod(locked, 0o644)
        self.clock.advance(1)
        with unprivileged():
            self.assertEqual(self.target(store, "b"), "h:2")
            self.assertEqual(self.target(store, "a"), "h:1")
        self.assertEqual(store.parse_count, 3)


class FileTokenStoreLinkTests(SynchronousTestCase):
    """Writing a token file never follows a planted symbolic link; loose modes are reported."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory, 0o755)
        self.victim = os.path.join(self.directory, "victim")
        with open(self.victim, "w") as f:
            f.write("precious\n")

    def refused(self, deferred: Deferred[Any], path: str) -> None:
        failure = self.failureResultOf(deferred, TokenStoreUnavailable)
        self.assertIn(f"{path} is a symbolic link", failure.getErrorMessage())
        with open(self.victim) as f:
            self.assertEqual(f.read(), "precious\n")

    def test_token_file_link(self) -> None:
        """issue and revoke refuse a token file that is a link (to a file or to nowhere) and
        leave its target alone."""
        tokens = os.path.join(self.directory, "tokens")
        os.symlink(self.victim, tokens)
        store = FileTokenStore(tokens, self.clock)
        self.refused(store.issue(make_record(TOKEN), TOKEN), tokens)
        self.refused(store.revoke(hash_token("precious")), tokens)
        dangling = os.path.join(self.directory, "dangling")
        os.symlink(os.path.join(self.directory, "created"), dangling)
        self.refused(
            FileTokenStore(dangling, self.clock).issue(make_record(TOKEN), TOKEN), dangling
        )
        self.assertFalse(os.path.exists(os.path.join(self.directory, "created")))

    def test_lock_file_link(self) -> None:
        """A planted ``.NAME.lock`` link creates nothing where it points, and nothing is
        written to the token file."""
        tokens = os.path.join(self.directory, "tokens")
        lock = os.path.join(self.directory, ".tokens.lock")
        elsewhere = os.path.join(self.directory, "elsewhere")
        os.symlink(elsewhere, lock)
        store = FileTokenStore(tokens, self.clock)
        self.refused(store.issue(make_record(TOKEN), TOKEN), lock)
        self.assertFalse(os.path.exists(elsewhere))
        self.assertFalse(os.path.exists(tokens))
        os.unlink(lock)
        os.symlink(self.victim, lock)
        self.refused(store.revoke(hash_token(TOKEN)), lock)

    def test_directory_store_links(self) -> None:
        """In a token directory, a linked issue file or lock file is refused too."""
        tokens = os.path.join(self.directory, "tokens.d")
        os.mkdir(tokens)
        issued = os.path.join(tokens, ISSUED_FILE_NAME)
        os.symlink(self.victim, issued)
        store = FileTokenStore(tokens, self.clock)
        self.refused(store.issue(make_record(TOKEN), TOKEN), issued)
        os.unlink(issued)
        lock = os.path.join(tokens, LOCK_FILE_NAME)
        os.unlink(lock)  # the real one, left by the first attempt
        os.symlink(os.path.join(self.directory, "elsewhere"), lock)
        self.refused(store.issue(make_record(TOKEN), TOKEN), lock)
        self.assertEqual(os.listdir(tokens), [LOCK_FILE_NAME])

    def test_reading_follows_links(self) -> None:
        """The proxy only reads: a token file that is a link (a Kubernetes Secret volume
        is one) still works."""
        with open(self.victim, "w") as f:
            f.write("a: h:1\n")
        tokens = os.path.join(self.directory, "tokens")
        os.symlink(self.victim, tokens)
        record = self.successResultOf(FileTokenStore(tokens, self.clock).lookup("a"))
        self.assertEqual(record.target, "h:1")

    def test_loose_permissions(self) -> None:
        """A group- or world-writable token file or directory is named once in the log (and
        by permission_problems, which ``vncmux token`` prints); a sticky shared directory
        holding a token file is not a problem."""
        tokens = os.path.join(self.directory, "tokens")
        with open(tokens, "w") as f:
            f.write("a: h:1\n")
        store = FileTokenStore(tokens, self.clock)
        self.assertEqual(store.permission_problems(), [])
        os.chmod(tokens, 0o664)
        os.chmod(self.directory, 0o777)
        problems = store.permission_problems()
        self.assertEqual(len(problems), 2, problems)
        self.assertIn(f"token file {tokens} is writable by group (mode 0664)", problems[0])
        self.assertIn(f"{self.directory} is writable by group and others", problems[1])
        for _ in range(3):
            self.successResultOf(store.ping())
            self.clock.advance(5)
        warned = [m for m in log_messages(self.log) if "writable by" in m]
        self.assertEqual(sorted(warned), sorted(problems))
        os.chmod(self.directory, 0o1777)
        self.assertEqual(len(store.permission_problems()), 1)
        os.chmod(self.directory, 0o755)


class _LockProbingStore(FileTokenStore):
    """Records, while a line is appended or a file rewritten, whether the lock is held."""

    def __init__(self, path: str, clock: Clock, lock_path: str) -> None:
        super().__init__(path, clock)
        self.lock_path = lock_path
        self.held: list[bool] = []

    def _probe(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            self.held.append(False)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another open file: must conflict
        except BlockingIOError:
            self.held.append(True)
        else:
            self.held.append(False)
        finally:
            os.close(fd)

    def _append_line(self, path: str, line: str) -> None:  # type: ignore[override]
        self._probe()
        super()._append_line(path, line)

    def _remove_lines(self, path: str, token_hash: str) -> bool:
        self._probe()
        return super()._remove_lines(path, token_hash)
