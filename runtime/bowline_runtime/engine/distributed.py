"""Where the ranks of one model copy live, how they find each other, and how the leader sees one die.

A model copy is `tensor_parallel_size x pipeline_parallel_size` ranks spread evenly over `nnodes`
processes ("nodes": pods of a LeaderWorkerSet, or plain processes). Global rank r runs on node
r // local_size; its tensor-parallel rank is r % tp and its pipeline stage r // tp, so one node holds
whole tensor-parallel groups when tp >= local_size (TP inside a node, PP across nodes, the layout
vLLM recommends for slow inter-node links).

Rendezvous goes through one torch.distributed TCPStore on the leader (rank 0, node 0): every rank
registers under `bowline/rank/<r>`, and the leader waits for all of them up to a deadline that names
the ranks still missing, before the process group (gloo, nccl or hccl) is built on the same store.

Liveness rides on a plain TCP connection from every other rank to the leader's watch port (master
port + 1): a process that dies, even by SIGKILL, has its socket closed by the kernel, so the leader
learns it at once, marks the group failed (/health answers 503) and closes every other watch
connection, on which the remaining workers exit. On a LeaderWorkerSet the restarted pod then makes
the controller recreate the whole group (RecreateGroupOnPodRestart).
"""

from __future__ import annotations

import datetime
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

logger = logging.getLogger("bowline.distributed")

_KEY = "bowline/rank/{}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The shape of one model copy: how many ranks, on how many nodes, which ones here."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.world_size % self.nnodes:
            raise ValueError(
                f"--tensor-parallel-size x --pipeline-parallel-size ({self.tensor_parallel_size} x "
                f"{self.pipeline_parallel_size} = {self.world_size}) must split evenly over --nnodes {self.nnodes}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def local_size(self) -> int:
        """Ranks (devices) on each node."""
        return self.world_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        return range(self.node_rank * self.local_size, (self.node_rank + 1) * self.local_size)

    def node_of(self, rank: int) -> int:
        return rank // self.local_size

    def local_rank(self, rank: int) -> int:
        """The device index of a rank on its node."""
        return rank % self.local_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def describe(self, rank: int) -> str:
        return f"rank {rank} (node {self.node_of(rank)}, tp rank {self.tp_rank(rank)}, pp stage {self.pp_rank(rank)})"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the leader listens: the TCPStore on `port`, the watch socket on `port + 1`."""

    addr: str
    port: int
    init_timeout: float
    watch: int | None = None  # one node: a second free port; several: port + 1

    @property
    def watch_port(self) -> int:
        return self.watch if self.watch is not None else self.port + 1


def connect_store(endpoint: Endpoint, rank: int) -> dist.TCPStore:
    """The leader hosts the store; the others connect, retrying until the init timeout."""
    timeout = datetime.timedelta(seconds=endpoint.init_timeout)
    try:
        store = dist.TCPStore(
            endpoint.addr, endpoint.port, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
        )
    except (RuntimeError, OSError) as exc:
        if rank == 0:
            raise RuntimeError(f"the leader cannot listen on {endpoint.addr}:{endpoint.port}: {exc}") from exc
        raise RuntimeError(
            f"rank {rank} could not reach the leader (rank 0) at {endpoint.addr}:{endpoint.port} within "
            f"{endpoint.init_timeout:.0f} s: {exc}"
        ) from exc
    store.set(_KEY.format(rank), socket.gethostname())
    return store


def wait_for_ranks(store: dist.TCPStore, layout: Layout, timeout: float, alive: Callable[[], None] | None = None) -> None:
    """On the leader: return once every rank registered; raise naming the missing ones at the deadline.

    `alive` is called while waiting, so a local rank that already crashed fails the wait at once.
    """
    missing = list(range(1, layout.world_size))
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in missing if not store.check([_KEY.format(r)])]
        if not missing:
            return
        if alive is not None:
            alive()
        if time.monotonic() >= deadline:
            names = ", ".join(layout.describe(r) for r in missing)
            nodes = sorted({layout.node_of(r) for r in missing})
            raise TimeoutError(
                f"{len(missing)} of {layout.world_size} ranks did not join within {timeout:.0f} s: {names}; "
                f"start node(s) {nodes} with --node-rank and the same --master-addr/--master-port "
                f"(or raise --distributed-init-timeout)"
            )
        time.sleep(0.1)


def init_group(backend: str, store: dist.TCPStore, rank: int, world_size: int, timeout: datetime.timedelta) -> None:
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class Watchdog:
    """On the leader: one socket per other rank; the first that closes while serving fails the group."""

    def __init__(self, layout: Layout, port: int, on_failure: Callable[[str], None], host: str = "") -> None:
        self.layout = layout
        self.on_failure = on_failure
        self.failure: str | None = None
        self._closing = False
        self._server = socket.create_server((host, port))
        self._conns: dict[socket.socket, int] = {}
        self._thread = threading.Thread(target=self._run, name="bowline-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closing:
            readable, _, _ = select.select([self._server, *self._conns], [], [], 0.5)
            for sock in readable:
                if sock is self._server:
                    self._accept()
                    continue
                try:
                    data = sock.recv(64)
                except OSError:
                    data = b""
                if data:
                    continue
                rank = self._conns.pop(sock)
                sock.close()
                if not self._closing and self.failure is None:
                    self._fail(rank)

    def _accept(self) -> None:
        try:
            conn, _ = self._server.accept()
            conn.settimeout(5)
            rank = int(conn.recv(16).decode().strip() or -1)
            conn.setblocking(True)
        except (OSError, ValueError):
            return
        if not 0 < rank < self.layout.world_size or rank in self._conns.values():
            conn.close()  # not one of this group's ranks: its coming and going mean nothing
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._conns[conn] = rank

    def _fail(self, rank: int) -> None:
        self.failure = (
            f"{self.layout.describe(rank)} is gone (its connection to the leader closed): the "
            f"{self.layout.world_size}-rank group is down and cannot serve; /health answers 503 until the "
            "group is recreated"
        )
        logger.error("distributed group failed: %s", self.failure)
        for conn in list(self._conns):  # take the rest of the group down with it
            conn.close()
        self._conns.clear()
        self.on_failure(self.failure)

    def stop(self) -> None:
        """Before an orderly shutdown: workers leaving from now on is no failure."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=2)
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        self._server.close()


def watch_leader(endpoint: Endpoint, rank: int) -> Callable[[], None]:
    """On a worker rank: connect to the leader's watchdog; exit this process when the leader goes away.

    Returns the function to call before an orderly exit (so that closing is not taken for a failure).
    """
    deadline = time.monotonic() + endpoint.init_timeout
    while True:
        try:
            sock = socket.create_connection((endpoint.addr, endpoint.watch_port), timeout=5)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.sendall(f"{rank}\n".encode())
    sock.settimeout(None)
    done = threading.Event()

    def wait() -> None:
        try:
            while sock.recv(64):
                pass
        except OSError:
            pass
        # An orderly shutdown releases this rank just before the leader closes: give it a moment.
        if not done.wait(timeout=3):
            logger.error("rank %d: the leader closed the group (it or another rank is gone); exiting", rank)
            os._exit(1)

    threading.Thread(target=wait, name="bowline-leader-watch", daemon=True).start()

    def release() -> None:
        done.set()
        sock.close()

    return release
