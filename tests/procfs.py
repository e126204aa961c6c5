"""
Readings of Linux's C{/proc} for tests and benchmarks (not part of the installed package):
which processes belong to a proxy, their CPU time, memory and descriptors, and the machine's
free memory. One place, so that the tests and C{benchmarks/run.py} count a process tree the
same way.

This module imports nothing outside the standard library.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: Clock ticks a second: the unit of the CPU times in C{/proc/PID/stat}.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of C{/proc/PID/stat} that the tests and benchmarks read."""

    state: str  # "Z": a zombie, not reaped yet
    ppid: int
    pgrp: int
    #: utime + stime of the process itself, in clock ticks.
    cpu_ticks: int
    #: cutime + cstime: the children it has reaped (waited for), in clock ticks.
    children_ticks: int

    @property
    def alive(self) -> bool:
        """Running or sleeping, not a zombie."""
        return self.state != "Z"


def read_stat(pid: int | str) -> ProcStat | None:
    """C{/proc/PID/stat} of a process, or C{None} once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its last ')'.
    # fields[0] is field 3 (state); ppid, pgrp are fields 4, 5; utime..cstime fields 14..17.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        children_ticks=int(fields[13]) + int(fields[14]),
    )


def all_stats() -> dict[int, ProcStat]:
    """The C{stat} of every process on the machine, by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(entry)
            if stat is not None:
                found[int(entry)] = stat
    return found


def is_alive(pid: int) -> bool:
    """Whether process C{pid} exists and is not a zombie."""
    stat = read_stat(pid)
    return stat is not None and stat.alive


def group_members(pgid: int, *, zombies: bool = False) -> list[int]:
    """The pids of process group C{pgid}: the live ones, and with C{zombies} the unreaped."""
    return [
        pid for pid, stat in all_stats().items() if stat.pgrp == pgid and (zombies or stat.alive)
    ]


def descendants(pid: int) -> list[int]:
    """The pids of the live (not zombie) descendants of process C{pid}."""
    children: dict[int, list[int]] = {}
    for child, stat in all_stats().items():
        if stat.alive:
            children.setdefault(stat.ppid, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_tree(leader: int) -> list[int]:
    """
    The processes of C{leader}'s process group and all their descendants, live or zombie,
    sorted: what one proxy is made of (a worker that made a group of its own still counts).
    """
    stats = all_stats()
    tree = {pid for pid, stat in stats.items() if stat.pgrp == leader}
    if leader in stats:
        tree.add(leader)
    grew = True
    while grew:
        grew = False
        for pid, stat in stats.items():
            if stat.ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sorted(tree)


def cpu_seconds(pid: int | str) -> float:
    """User plus system CPU time of a process so far, in whole clock ticks."""
    stat = read_stat(pid)
    if stat is None:
        raise ProcessLookupError(f"process {pid} is gone")
    return stat.cpu_ticks / CLOCK_TICKS


def schedstat_seconds(pid: int) -> float | None:
    """
    CPU time of every live thread of a process, from C{schedstat} in nanoseconds (finer than
    the ticks of C{stat}); C{None} if unreadable.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of a process in KiB; (0, 0) if it is gone or a zombie."""
    pss = rss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                pss = int(line.split()[1])
            elif line.startswith(b"Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def resident_kib(pid: int | str = "self") -> int:
    """The resident set (VmRSS) of a process now, not its peak, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS (a kernel thread or a zombie)")


def open_fds(pid: int | str) -> Counter[str]:
    """What a process's descriptors point at (sockets by kind, files by path), counted."""
    found: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            found[target.split(":", 1)[0] if target.startswith("socket:") else target] += 1
    return found


def mem_available_kib() -> int:
    """MemAvailable from C{/proc/meminfo}: what the machine can still give without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


__all__ = [
    "CLOCK_TICKS",
    "ProcStat",
    "all_stats",
    "cpu_seconds",
    "descendants",
    "group_members",
    "is_alive",
    "mem_available_kib",
    "open_fds",
    "process_tree",
    "read_stat",
    "resident_kib",
    "schedstat_seconds",
    "smaps_rollup",
]
