"""One writer per sweep: the sweep's lease, and the mark each running trial attempt leaves.

Every command that writes a sweep (``clgrid run``, ``resume``, ``sync``, ``reap``) holds its lease
while it works, taken before anything else. Two of them on one sweep would train its trials twice,
upload its points twice, or remove each other's replay shards.

The lease is a sequence of generations, ``<sweep>/lease/NNNNNN.json``; the highest one is the
current lease. Each names its holder (command, host, boot id, pid, process start time), when it
was taken and when it was last renewed; a daemon thread renews it every ``RENEW_SECONDS`` and
marks it released when the command ends. A generation is created by linking a complete file into
place, which fails when the name exists (also on NFS), and no generation is ever removed or
created twice: so of the commands that find generation N free (released) or its holder dead, exactly
one creates N + 1; the others find N + 1 held and exit 2. The files stay as the sweep's history.

A holder is **dead** when it ran on this machine (same host name and boot id) and its process is
gone (no such pid, a zombie, or another process with its pid: another start time), or when it ran
elsewhere and has not renewed its lease for ``timeout`` seconds (``CLGRID_LEASE_TIMEOUT``, default
120; the hosts' clocks must agree to well within it, as NTP keeps them).

Trials keep writing after their driver died (a cluster's workers, a local worker Ray has not yet
ended). So each trial attempt holds a mark, ``<trial>/writer.json`` (same holder record, renewed
the same way, removed at its end), and whoever takes over a lease from a dead holder first waits
until every trial's mark is gone or its holder dead: provably nothing of the old driver writes when
the new holder starts. A trial attempt waits the same way for an earlier attempt of its own trial
(Ray retrying it), so one trial folder, and its replay store, has one writer at a time.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from clgrid import fsio
from clgrid.errors import UsageError
from clgrid.sweep.layout import SweepDir, TrialDir

RENEW_SECONDS = 10.0
TIMEOUT_ENV, DEFAULT_TIMEOUT = "CLGRID_LEASE_TIMEOUT", 120.0
POLL_SECONDS = 0.5  # how often a takeover looks at the marks of the old holder's trials
_GENERATION = re.compile(r"^(\d{6,})\.json$")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: only the renewal clock decides
        return ""


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22); None if it is
    gone or a zombie (it writes nothing more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 (the state) is index 0
    return None if fields[0] in ("Z", "X") else int(fields[19])


def identity() -> dict[str, Any]:
    """This process, so that another can tell whether it still runs (its pid may be reused)."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": start_ticks(os.getpid())}


def on_this_machine(record: dict[str, Any]) -> bool:
    return bool(record.get("boot")) and (record.get("host"), record["boot"]) == (socket.gethostname(), _boot_id())


def judge(record: dict[str, Any], timeout: float, now: float | None = None) -> tuple[bool, str]:
    """(alive, why) of the holder of a lease or trial mark."""
    if on_this_machine(record) and record.get("start") is not None:
        if start_ticks(record["pid"]) != record["start"]:
            return False, f"pid {record['pid']} on this machine is gone"
        return True, f"pid {record['pid']} on this machine is running"
    age = (now or time.time()) - record["renewed"]
    if age > timeout:
        return False, f"not renewed for {age:.0f}s (> {timeout:.0f}s)"
    return True, f"renewed {age:.0f}s ago"


def timeout_seconds() -> float:
    """``CLGRID_LEASE_TIMEOUT``: how long a holder elsewhere may go without renewing before it counts as dead."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 3 * RENEW_SECONDS <= value < float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={raw}: expected seconds, at least {3 * RENEW_SECONDS:.0f} (three "
                         f"renewal periods)")
    return value


class LeaseHeld(UsageError):
    """The sweep's lease is held by a live command (exit 2, the message names it)."""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class _Renewal:
    """A daemon thread rewriting ``path`` with a fresh ``renewed`` every RENEW_SECONDS; ``lost()``,
    when given, says once whether someone else has taken over (then a warning is printed)."""

    def __init__(self, path: Path, record: dict[str, Any], lost: Callable[[], str | None] = lambda: None):
        self.path, self.record, self.lost = path, record, lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"clgrid-lease-{path.name}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        warned = False
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self.write(renewed=time.time())
                taker = None if warned else self.lost()
            except OSError as exc:  # storage briefly away: the next renewal tries again
                print(f"clgrid: warning: cannot renew {self.path} ({exc})", file=sys.stderr, flush=True)
                continue
            if taker:
                warned = True
                print(f"clgrid: warning: {taker} took over this command's lease ({self.path} went unrenewed too "
                      f"long); both now write the sweep: stop one of them", file=sys.stderr, flush=True)

    def write(self, **changes: Any) -> None:
        self.record.update(changes)
        fsio.write_json(self.path, self.record)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class SweepLease:
    """Context manager: holds the lease of ``sweep`` for ``command`` (``clgrid run`` ...) or raises
    UsageError (exit 2) naming the live holder. Taking over a dead holder's lease waits until the
    trials it drove have stopped writing."""

    def __init__(self, sweep: SweepDir, command: str, timeout: float | None = None):
        self.sweep, self.command = sweep, command
        self.timeout = timeout_seconds() if timeout is None else timeout
        self.path: Path | None = None
        self.previous: tuple[dict[str, Any], str] | None = None  # the holder before, and why it was free
        self._renewal: _Renewal | None = None

    def __enter__(self) -> SweepLease:
        folder = self.sweep.lease
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # another command took the next generation first: look again
            previous, holder = self._current(folder)
            if holder is not None:
                alive, why = (False, "ended, releasing its lease") if holder["released"] else judge(holder, self.timeout)
                if alive:
                    raise LeaseHeld(self._held(holder, why))
                self.previous = holder, why
            now = time.time()
            record = {"command": self.command, **identity(), "since": now, "renewed": now,
                      "renew_every": RENEW_SECONDS, "released": False}
            path = folder / f"{previous + 1:06d}.json"
            try:
                fsio.create_json(path, record)
            except FileExistsError:
                continue
            self.path, self._renewal = path, _Renewal(path, record, lambda: self._taken_by(folder, previous + 1))
            try:
                wait_for_trials(self.sweep, self.timeout)
            except BaseException:
                self.__exit__()
                raise
            return self
        raise LeaseHeld(f"{folder}: the lease changed hands 20 times while this command tried to take it; "
                        "expected one command at a time on a sweep")

    def __exit__(self, *exc: Any) -> None:
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal.write(released=True, renewed=time.time())
            self._renewal = None

    @staticmethod
    def _current(folder: Path) -> tuple[int, dict[str, Any] | None]:
        """(highest generation, its record); (0, None) before the first."""
        gens = sorted(int(m[1]) for p in folder.iterdir() if (m := _GENERATION.match(p.name)))
        if not gens:
            return 0, None
        return gens[-1], fsio.read_json(folder / f"{gens[-1]:06d}.json")

    @classmethod
    def _taken_by(cls, folder: Path, mine: int) -> str | None:
        """Who holds a generation after ``mine``, if anyone does."""
        generation, holder = cls._current(folder)
        return f"`{holder['command']}` (pid {holder['pid']} on {holder['host']})" if generation > mine else None

    def _held(self, holder: dict[str, Any], why: str) -> str:
        return (f"sweep {self.sweep.path.name} is held by `{holder['command']}` (pid {holder['pid']} on "
                f"{holder['host']}, since {_when(holder['since'])}; {why}); wait for it to end or stop it; "
                f"a dead holder's lease is taken over at once on its machine, elsewhere after "
                f"{self.timeout:.0f}s without renewal ({TIMEOUT_ENV})")


def wait_for_trials(sweep: SweepDir, timeout: float) -> None:
    """Returns once no trial of ``sweep`` has a live attempt (its mark absent, or its holder dead)."""
    told: set[str] = set()
    for trial in sorted(p for p in sweep.path.iterdir() if p.is_dir()):
        wait_for_writer(TrialDir(trial), timeout, told)


def wait_for_writer(trial: TrialDir, timeout: float, told: set[str] | None = None) -> None:
    """Waits while the mark in ``trial`` names a live process other than this one."""
    told = set() if told is None else told
    while True:
        try:
            record = fsio.read_json(trial.writer)
        except FileNotFoundError:
            return
        if record.get("pid") == os.getpid() and on_this_machine(record):
            return  # this process's own earlier attempt (a reused Ray actor): it has ended
        alive, why = judge(record, timeout)
        if not alive:
            return
        if str(trial.path) not in told:
            told.add(str(trial.path))
            print(f"clgrid: waiting for the attempt writing {trial.path} to stop (pid {record['pid']} on "
                  f"{record['host']}, {why})", file=sys.stderr, flush=True)
        time.sleep(POLL_SECONDS)


class TrialWriter:
    """Context manager around one trial attempt: waits for an earlier live attempt of the trial to
    stop, then marks the folder with this process until the attempt ends."""

    def __init__(self, trial: TrialDir, timeout: float | None = None):
        self.trial = trial
        self.timeout = timeout_seconds() if timeout is None else timeout
        self._renewal: _Renewal | None = None

    def __enter__(self) -> TrialWriter:
        wait_for_writer(self.trial, self.timeout)
        now = time.time()
        record = {"command": "trial", **identity(), "since": now, "renewed": now, "renew_every": RENEW_SECONDS,
                  "token": secrets.token_hex(8)}
        fsio.write_json(self.trial.writer, record)
        self._renewal = _Renewal(self.trial.writer, record)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._renewal.stop()
        try:
            if fsio.read_json(self.trial.writer).get("token") == self._renewal.record["token"]:
                self.trial.writer.unlink()
        except FileNotFoundError:
            pass
