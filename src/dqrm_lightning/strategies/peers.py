"""``PeerWatch``: which ranks of a multi-process run are still alive, told apart without a clock shared by machines.

When a rank dies (a node crashes, is killed, loses power), the others learn it only from a collective that fails
with gloo's "connection closed by peer [address]:port", which names no rank: under torchrun or SLURM no launcher of
ours holds the other processes to ask. So every rank bumps its own counter in the process group's key-value store
(the rendezvous store of torchrun, SLURM or Lightning's launcher) once per ``interval`` from a daemon thread, and
writes once where it runs (node rank and host name). After a failure :meth:`PeerWatch.dead` reads the counters
twice, a few beats apart: a rank whose counter stood still is gone. When the store itself cannot be reached, the
process hosting it (on node 0) is gone.

Example::

    watch = PeerWatch(store, rank=0, world_size=2, node_rank=0)
    watch.start()
    ...  # a collective fails
    watch.dead()  # ["rank 1 (node 1, host n2)"]
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

_PREFIX = "dqrm/peers"


class PeerWatch:
    """Heartbeat counters of the ranks of one run in a :class:`torch.distributed.Store`.

    Args:
        store: the store every rank of the run reaches (the default process group's).
        rank: this process's global rank.
        world_size: ranks in the run.
        node_rank: this process's node.
        interval: seconds between two beats.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, node_rank: int, interval: float = 1.0) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.node_rank = node_rank
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Say where this rank runs and start beating."""
        self.store.set(self._key("where", self.rank), f"node {self.node_rank}, host {socket.gethostname()}")
        self._thread = threading.Thread(target=self._beat, name="dqrm-peer-watch", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 2.0) -> None:
        """Stop beating (the run ended, or this rank failed: a rank that is not running does not beat), waiting up to
        ``wait`` seconds for the thread to end (a thread still inside a store call as the interpreter exits can abort
        the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(self._key("beats", self.rank), 1)
            except Exception:  # the store's host is gone, or the run ends: nothing to report from this thread
                return
            self._stop.wait(self.interval)

    def _key(self, kind: str, rank: int) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    def _beats(self) -> list[int]:
        return [self.store.add(self._key("beats", rank), 0) for rank in range(self.world_size)]

    def _where(self, rank: int) -> str:
        key = self._key("where", rank)
        return self.store.get(key).decode() if self.store.check([key]) else "never started"

    def dead(self, beats: int = 3) -> list[str] | None:
        """The other ranks whose counters stood still for ``beats`` intervals, as ``"rank R (node N, host H)"``;
        ``None`` when the store cannot be reached (its host, on node 0, is gone)."""
        try:
            before = self._beats()
            time.sleep(beats * self.interval)
            after = self._beats()
            return [
                f"rank {rank} ({self._where(rank)})"
                for rank in range(self.world_size)
                if rank != self.rank and after[rank] == before[rank]
            ]
        except Exception:  # DistStoreError, or a RuntimeError of the store's connection
            return None


def default_store() -> dist.Store | None:
    """The default process group's store (torch keeps it private), or None where this torch has none."""
    with contextlib.suppress(AttributeError, RuntimeError, ValueError):
        return dist.distributed_c10d._get_default_store()
    return None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_torchrun_agent() -> bool:
    """Under torchrun, have the kernel SIGKILL this rank when its torchrun agent dies (Linux; True when set).

    torchrun starts each rank in a session of its own, so a signal to the agent's process group does not reach the
    rank, and an agent killed with SIGKILL has no time to stop it: the rank would train on as an orphan and the run
    would never notice that a node was lost. With the parent-death signal the rank dies with its agent, like the
    rest of a lost node, and the other ranks stop naming it (:class:`PeerWatch`).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
