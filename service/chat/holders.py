"""Who holds a chat turn: a random token plus the holding process's identity (host, boot, pid
namespace, pid, start time), so that a process starting on the same host can tell a turn whose
holder was killed (SIGKILL, OOM) from one a live process still answers, and free it at once
instead of after the lease.

A process is known gone only when the holder ran on this host, in this boot and this pid
namespace, and no process with its pid and start time exists. Anything else (another host,
another container sharing the hostname, no /proc) is left to the lease.
"""

from __future__ import annotations

import functools
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SEP: Final = "|"  # never in a hostname, a boot id or a namespace link


@dataclass(frozen=True, slots=True)
class Process:
    host: str
    boot: str  # /proc/sys/kernel/random/boot_id; "" where unknown
    pidns: str  # /proc/self/ns/pid's link, e.g. "pid:[4026531836]"; "" where unknown
    pid: int
    start: int  # start time in clock ticks since boot (/proc/<pid>/stat, field 22); 0 unknown

    @property
    def known(self) -> bool:
        return bool(self.boot and self.pidns and self.start)


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def start_time(pid: int) -> int:
    """The process's start time (clock ticks since boot), or 0 when there is no such process."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


@functools.lru_cache(maxsize=1)
def _identity(pid: int) -> Process:
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return Process(
        host=socket.gethostname(),
        boot=_read("/proc/sys/kernel/random/boot_id"),
        pidns=pidns,
        pid=pid,
        start=start_time(pid),
    )


def this_process() -> Process:
    return _identity(os.getpid())  # keyed by pid: a forked child is another holder


def new_holder(token: str | None = None) -> str:
    """A fresh turn holder of this process: `token|host|boot|pidns|pid|start`. The token is the
    turn's answer id (its stream id, so a turn refused for this one can name the stream to
    resume), or random."""
    me = this_process()
    token = token or secrets.token_hex(8)
    parts = (token, me.host, me.boot, me.pidns, str(me.pid), str(me.start))
    return SEP.join(parts)


def token_of(holder: str) -> str:
    """The token part of a holder (the whole of an older, bare one)."""
    return holder.split(SEP, 1)[0]


def parse(holder: str) -> Process | None:
    """The process recorded in a holder, or None (an older holder: a bare token)."""
    parts = holder.split(SEP)
    if len(parts) != 6 or not parts[4].isdecimal() or not parts[5].isdecimal():
        return None
    return Process(parts[1], parts[2], parts[3], int(parts[4]), int(parts[5]))


def gone(holder: str, here: Process | None = None) -> bool:
    """Whether the holder's process is known to no longer exist (see the module's note)."""
    held_by = parse(holder)
    here = here or this_process()
    if held_by is None or not (held_by.known and here.known):
        return False
    if (held_by.host, held_by.boot, held_by.pidns) != (here.host, here.boot, here.pidns):
        return False
    return start_time(held_by.pid) != held_by.start
