"""Every rank of a multi-rank run watches the others, so that one rank dying, hanging or losing its
node stops the whole run within seconds, with a message naming it, instead of leaving the others
in a collective until the process group's timeout (30 minutes by default).

Each rank keeps a heartbeat counter in the rendezvous store (its own TCPStore client of the server
that rank 0 started for the process group on MASTER_ADDR:MASTER_PORT) and, once a second:
- sees a rank on its own node whose process has ended (no such pid, or a zombie) within seconds;
- rank 0 sees any rank whose counter has not moved for `train.peer_timeout` seconds (it hangs, or
  its node is gone), and announces it in the store; every rank reads the announcements;
- the other ranks see the store unreachable for `train.peer_timeout` seconds: rank 0, which
  serves it, is lost.
A rank that ended on its own marks its exit code first: a peer that ended with 0 is never lost, one
that ended with another code is, once this rank has outlived it by `ENDED_GRACE_S` (the same error
usually ends every rank by itself). The rank that sees a loss exits with EXIT_PEER_LOST.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from .signals import EXIT_PEER_LOST

KEY = "halo-train/peers/"
INTERVAL_S = 1.0
ENDED_GRACE_S = 10.0  # a peer ended with an error code; it may be the error this rank meets next
STORE_WAIT_S = 2.0  # the longest a check waits for the store
LOCAL_GRACE_S = 3.0  # a peer's process is gone, unmarked: its mark may still be on its way


@dataclass(frozen=True)
class Peer:
    rank: int
    pid: int
    host: str
    machine: str  # the host's boot id and this process's pid namespace: pids compare only within one

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


def this_machine() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}:no-proc"


def process_ended(pid: int) -> bool:
    """No process has this pid any more, or it is a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except OSError:
            return False


class PeerWatch:
    """start() after the process group exists; stop(code) when this rank ends on its own."""

    def __init__(self, rank: int, world_size: int, addr: str, port: int, timeout_s: float,
                 before_exit: Callable[[], None] = lambda: None, stream=None, clock=time.monotonic):
        self.rank, self.world_size, self.addr, self.port = rank, world_size, addr, port
        self.timeout_s, self.before_exit, self.clock = timeout_s, before_exit, clock
        self.stream = stream if stream is not None else sys.stderr
        self.store = None
        self.peers: dict[int, Peer] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread's checks and a check asked for from the main thread
        self.ended: dict[int, str] = {}  # rank -> the exit code it marked, as read from the store

    def start(self) -> "PeerWatch":
        """Join the watch and check once a second from a thread of its own (multi-rank runs only)."""
        if self.world_size == 1:
            return self
        self.connect()
        Bounded(self._read_peers).wait(self.timeout_s)  # the others start with this rank; else the watch retries
        self._thread = threading.Thread(target=self._run, name="halo-train-peer-watch", daemon=True)
        self._thread.start()
        return self

    def connect(self) -> None:
        """Write this rank's pid, host and first heartbeat to the store."""
        from torch.distributed import TCPStore

        self.store = TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=self.timeout_s))
        self.me = Peer(self.rank, os.getpid(), socket.gethostname(), this_machine())
        self.store.set(f"{KEY}peer/{self.rank}", json.dumps(self.me.__dict__))
        self.store.add(f"{KEY}beat/{self.rank}", 1)
        for name in ("ended", "lost"):
            self.store.append(KEY + name, "")  # created empty, so that reading it never waits
        now = self.clock()
        self.last_beat = {r: (-1, now) for r in range(self.world_size)}  # rank -> (counter, when it moved)
        self.store_ok_at = now
        self.suspected: dict[tuple[int, str], float] = {}  # (rank, kind) -> when first suspected
        self._round: Bounded | None = None  # the store call of the current check, or one still pending

    def stop(self, code: int | None) -> None:
        """This rank ends by itself with exit `code` (None: an error on its way to the caller). The peers
        never count an end with 0 as a loss; another code, once they have outlived this rank by ENDED_GRACE_S."""
        if self._thread is None or self._stopped.is_set():
            return
        self._stopped.set()
        self._thread.join(timeout=INTERVAL_S + STORE_WAIT_S + 1)
        mark = f"{self.rank}:{'?' if code is None else code};"
        Bounded(lambda: self.store.append(KEY + "ended", mark)).wait(STORE_WAIT_S)  # rank 0 may have ended first

    def loss(self) -> str | None:
        """Why the run lost a rank, checked now, for a collective that just failed: a peer's process
        gone, a peer that ended with an error, a loss another rank announced, or the store unreachable.
        None: no peer is known lost."""
        if self._thread is None:
            return None
        with self._lock:
            why, _ = self._check(settle=False)
            return why

    # ---- the watching thread -----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped.wait(INTERVAL_S):
            with self._lock:
                if self._stopped.is_set():
                    return
                why, announce = self._check(settle=True)
            if why is not None and not self._stopped.is_set():  # a rank that is ending by itself keeps its code
                if announce:
                    self._announce(why)
                self._stop_this_rank(why)

    def _stop_this_rank(self, why: str) -> None:
        self.stream.write(f"halo-train: rank {self.rank}: error: {why}; stopping this rank too (exit "
                          f"{EXIT_PEER_LOST}). Rerun the same command to resume from the newest checkpoint\n")
        self.stream.flush()
        try:
            self.before_exit()
        finally:
            os._exit(EXIT_PEER_LOST)

    def _check(self, settle: bool) -> tuple[str | None, bool]:
        """(why a rank is lost, whether to announce it to the others), or (None, False). With `settle`,
        a suspicion must last its grace first: a peer that ended or vanished may have met the error
        this rank is about to meet too, and then each rank should exit with its own code."""
        now = self.clock()
        if self._round is None:
            self._round = Bounded(self._store_round)
        lost, ended, beats = "", "", []
        if self._round.wait(STORE_WAIT_S):
            done, self._round = self._round, None
            store_error = done.error
            if store_error is None:
                lost, ended, beats = done.result
                self.store_ok_at = now
        else:  # no answer yet: its server (rank 0) may be frozen; the call stays pending
            store_error = TimeoutError("no answer")
        if ended:
            self.ended = self._parse_ended(ended)
        if lost:
            return lost.split("\n")[0], False
        suspects = []  # (rank, kind, why, grace in seconds)
        for peer in self.peers.values():
            if peer.rank != self.rank and peer.machine == self.me.machine and peer.rank not in self.ended \
                    and process_ended(peer.pid):
                why = f"{peer} died: its process is gone (killed, or out of memory: see its log and the kernel's)"
                suspects.append((peer.rank, "died", why, LOCAL_GRACE_S))
        if store_error is not None and self.rank != 0 and (not settle or now - self.store_ok_at >= self.timeout_s):
            detail = type(store_error).__name__ + (f": {str(store_error).splitlines()[0][:200]}" if str(store_error)
                                                   else "")
            why = (f"{self._name(0)}, which serves the rendezvous store at {self.addr}:{self.port}, did not answer "
                   f"for {now - self.store_ok_at:.0f} s ({detail}): it died, hangs, or its node is lost")
            suspects.append((0, "store", why, 0.0))
        for rank, code in self.ended.items():
            if code != "0" and rank != self.rank:
                how = "with an error" if code == "?" else f"with exit {code}"
                why = f"{self._name(rank)} ended {how} (its log says why) while this rank was still running"
                suspects.append((rank, "ended", why, ENDED_GRACE_S))
        if settle:
            for rank, value in enumerate(beats):
                count, since = self.last_beat[rank]
                if int(value) != count:
                    self.last_beat[rank] = (int(value), now)
                elif rank != 0 and rank not in self.ended and now - since >= self.timeout_s:
                    why = (f"{self._name(rank)} sent no heartbeat for {now - since:.0f} s (train.peer_timeout="
                           f"{self.timeout_s:g}): it hangs, or its node is lost")
                    suspects.append((rank, "silent", why, 0.0))
        for rank, kind, why, grace in suspects:
            first = self.suspected.setdefault((rank, kind), now)
            if not settle or now - first >= grace:
                return why, store_error is None
        return None, False

    def _store_round(self) -> tuple[str, str, list[bytes]]:
        """Beat, then read what the others announced and marked (rank 0: every rank's beat too)."""
        self.store.add(f"{KEY}beat/{self.rank}", 1)
        if not self.peers:
            self._read_peers()
        lost, ended = (v.decode() for v in self.store.multi_get([KEY + "lost", KEY + "ended"]))
        beats = self.store.multi_get([f"{KEY}beat/{r}" for r in range(self.world_size)]) if self.rank == 0 else []
        return lost, ended, beats

    def _read_peers(self) -> None:
        """Every rank's pid and host (each wrote its own as it started)."""
        values = self.store.multi_get([f"{KEY}peer/{r}" for r in range(self.world_size)])
        self.peers = {r: Peer(**json.loads(v)) for r, v in enumerate(values)}

    @staticmethod
    def _parse_ended(text: str) -> dict[int, str]:
        out = {}
        for item in text.split(";"):
            if item:
                rank, _, code = item.partition(":")
                out[int(rank)] = code
        return out

    def _name(self, rank: int) -> str:
        return str(self.peers[rank]) if rank in self.peers else f"rank {rank}"

    def _announce(self, why: str) -> None:
        """Tell every rank; they read it within a second."""
        Bounded(lambda: self.store.append(KEY + "lost", f"rank {self.rank} reports: {why}\n")).wait(STORE_WAIT_S)


class Bounded:
    """A store call in a daemon thread of its own, waited for at most a while: the TCP store's own
    timeout does not cover a server that stopped answering (a frozen rank 0), and a call blocked for
    good must neither stall the watch nor keep the process from exiting."""

    def __init__(self, call: Callable[[], object]):
        self.result, self.error = None, None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(call,), name="halo-train-peer-store", daemon=True).start()

    def _run(self, call) -> None:
        try:
            self.result = call()
        except Exception as e:  # unreachable (connection refused or reset)
            self.error = e
        self._done.set()

    def wait(self, seconds: float) -> bool:
        return self._done.wait(seconds)
