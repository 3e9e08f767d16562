"""Messages between ranks: the only module that imports mpi4py.

A message is a fixed int64 header followed by raw buffers, with uppercase `Isend`/`Irecv` on numpy
views: never a pickled tensor. The header holds the kind, the send time, up to `MAX_FIELDS` integers
of the sender's own (what they mean is messages.py's business, not this module's) and each buffer's
dtype and shape. Lowercase (pickled) calls carry only small control data at start and end.

Emulated links (hostfile `link=`, `latency=`): every header carries its send time, and the
receiver holds a message until latency_a + latency_b + bytes / min(bw_a, bw_b) after it was sent,
and after the previous message on the same link has finished crossing it (a link carries one
message at a time). Ranks read one clock (CLOCK_MONOTONIC), so this needs them on one host.

Waiting never spins: ranks on one host share its cores, and MPICH's blocking calls busy-poll.
Every wait here tests its requests and sleeps between tests with a short, growing back-off
(50 us up to EDGESHARD_POLL_MAX_US, default 1000 us), so an idle rank costs almost no CPU while
a busy pipeline still hears of a message within a fraction of a millisecond.

Lost ranks: mpiexec (hydra) ends the whole job at once when a rank dies, but a rank that hangs
(stopped, stuck in a step, its host gone silent) would hold the pipeline forever. So rank 0's
waits on the pipeline stop after `step_timeout` seconds without a message (runner.py sets it on
rank 0 for the run). Halfway through such a silence rank 0 pings every other rank; any rank
waiting in this module answers at once, so at the timeout the ranks that have not answered are
the lost ones, and RankLost names them with their devices. Only rank 0 times out: the other
ranks may wait on it as long as it works (a slow prefill, an idle end) and die with its abort.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from .cluster import boot_id

__all__ = ["Comm", "Message", "RankLost", "ACT", "TOKENS", "STOP", "versions"]

ACT, TOKENS, STOP = 1, 2, 3  # message kinds
_TAG_PIPE, _TAG_TOKENS = 11, 12  # stage -> next stage, head -> source
_TAG_PING, _TAG_PONG = 13, 14  # rank 0 -> a rank it suspects, and the answer (liveness checks)
MAX_FIELDS, MAX_BUFFERS, _MAX_NDIM = 16, 4, 3
# kind, send time (ns), field count, buffer count, the fields, then per buffer: dtype code, ndim, dims
_HEADER = 4 + MAX_FIELDS + MAX_BUFFERS * (2 + _MAX_NDIM)
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float64]
# numpy has no bfloat16: its raw 2-byte words travel as int16 and are viewed back on arrival
_NP = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16, torch.int64: np.int64,
       torch.float64: np.float64}
_POLL_MIN = 50e-6
_POLL_MAX = float(os.environ.get("EDGESHARD_POLL_MAX_US", "1000")) * 1e-6


@dataclasses.dataclass
class Message:
    kind: int
    fields: list[int] = dataclasses.field(default_factory=list)
    buffers: list[torch.Tensor] = dataclasses.field(default_factory=list)


class RankLost(RuntimeError):
    """Rank 0 heard nothing from the pipeline for the step timeout; `ranks` did not answer a check."""

    def __init__(self, message: str, ranks: list[int]):
        super().__init__(message)
        self.ranks = ranks


class Comm:
    """MPI_COMM_WORLD with tensor messages and non-spinning waits."""

    def __init__(self):
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._links: dict[int, tuple[float, float]] = {}  # source rank -> (latency s, bytes/s)
        self._link_free: dict[int, float] = {}  # source rank -> when its link finishes the last message
        self._pending: list = []  # sends in flight: (requests, buffers kept alive until done, dest)
        self.step_timeout: float | None = None  # rank 0, during a run: seconds of pipeline silence allowed
        self.names = [f"rank{r}" for r in range(self.size)]  # device names, for messages
        self._pongs: dict[int, tuple] = {}  # rank 0: rank -> (answer request, buffers) of a pending check
        # mpiexec names a process that died by its pid and host only: keep them to map it to a rank
        self.barrier()
        self.where: list[tuple[str, int]] = self.comm.allgather((os.uname().nodename, os.getpid()))
        # which machine each rank is on, where host names may repeat (edge boards all called "raspberrypi")
        self.boots: list[str] = self.comm.allgather(boot_id())
        # per rank: (cores this process may use, ranks on its host), for its default thread count; MPI's
        # shared-memory split finds the ranks that share a host, whatever the hosts are called
        on_host = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.hosts: list[tuple[int, int]] = self.comm.allgather((len(os.sched_getaffinity(0)), on_host.Get_size()))
        on_host.Free()
        self.threads: list[int] | None = None  # per rank, for the rank table, once the cluster is known
        self.precision: list[str] | None = None  # per rank: its dtype (and quantization), for the rank table

    def _wait(self, requests: list, peer: int | None = None) -> None:
        """Wait for all requests without spinning: test, then sleep a growing while.

        Other ranks answer rank 0's liveness checks while they wait. Rank 0, when it waits on
        `peer` with a step timeout set, checks the other ranks halfway and raises RankLost at the end.
        """
        delay = _POLL_MIN
        limit = self.step_timeout if peer is not None else None
        start = time.monotonic()
        checked = False
        while not MPI.Request.Testall(requests):
            if self.rank != 0:
                self._answer_checks()
            elif limit:
                silent = time.monotonic() - start
                if not checked and silent >= limit / 2:
                    self._check_ranks()
                    checked = True
                if silent >= limit:
                    raise self._lost(peer, limit)
            time.sleep(delay)
            delay = min(delay * 1.5, _POLL_MAX)

    # -- liveness checks (rank 0 asks, every other rank answers from its waits) -----------------
    def _answer_checks(self) -> None:
        if self.comm.Iprobe(source=0, tag=_TAG_PING):
            buf = np.empty(1, dtype=np.int64)
            self.comm.Recv(buf, source=0, tag=_TAG_PING)
            self.comm.Send(buf, dest=0, tag=_TAG_PONG)  # 8 bytes: sent eagerly, returns at once

    def _check_ranks(self) -> None:
        """Ask every other rank to answer (those asked before and still silent are not asked again)."""
        for r in range(1, self.size):
            if r in self._pongs:
                continue
            ping, pong = np.zeros(1, dtype=np.int64), np.empty(1, dtype=np.int64)
            try:
                reqs = [self.comm.Irecv(pong, source=r, tag=_TAG_PONG), self.comm.Isend(ping, dest=r, tag=_TAG_PING)]
            except MPI.Exception:
                continue  # the library already knows it is gone: it counts as silent
            self._pongs[r] = (reqs, (ping, pong))

    def _silent(self) -> list[int]:
        """Ranks that have not answered their check; the ones that did are forgotten."""
        for r in [r for r, (reqs, _) in self._pongs.items() if MPI.Request.Testall(reqs)]:
            del self._pongs[r]
        return sorted(self._pongs)

    def _lost(self, peer: int, limit: float) -> RankLost:
        silent = self._silent()
        if silent:
            who = ", ".join(f"rank {r} (device {self.names[r]})" for r in silent)
            return RankLost(f"{who} sent nothing for {limit:g} s: lost (no answer to a check after "
                            f"{limit / 2:g} s; --step-timeout {limit:g}). The results finished so far are kept: "
                            "run again with --resume (without the lost device if it is gone)", silent)
        return RankLost(f"rank {peer} (device {self.names[peer]}) sent nothing for {limit:g} s, yet every rank "
                        f"answers: a step takes longer than --step-timeout {limit:g}, or the pipeline is stuck", [])

    def _drop_checks(self) -> None:
        """Withdraw the answers still awaited, so no receive outlives the run."""
        for reqs, _ in self._pongs.values():
            if not reqs[0].Test():
                reqs[0].Cancel()
            self._wait(reqs)
        self._pongs = {}

    def rank_table(self) -> str:
        """Each rank's device, host, pid, threads and dtype: mpiexec's report of a failed process names
        its pid and host only."""
        threads = self.threads or [None] * self.size
        precision = self.precision or [None] * self.size
        rows = []
        for r, ((host, pid), t, p) in enumerate(zip(self.where, threads, precision)):
            details = [f"pid {pid} on {host}"] + ([f"{t} thread{'s' * (t > 1)}"] if t else []) + ([p] if p else [])
            rows.append(f"{r} {self.names[r]} ({', '.join(details)})")
        return ", ".join(rows)

    def emulate_links(self, devices) -> None:
        """Shape messages between ranks as the devices' declared links (cluster.Device per rank)."""
        self.names = [d.name for d in devices]  # to name a lost rank by its device
        me = devices[self.rank]
        self._links = {}
        for r, d in enumerate(devices):
            if r == self.rank or (d.bandwidth is None and me.bandwidth is None and d.latency + me.latency == 0):
                continue
            bw = min(b for b in (d.bandwidth, me.bandwidth, float("inf")) if b is not None)
            self._links[r] = (d.latency + me.latency, bw)

    def _deliver(self, source: int, sent_ns: int, nbytes: int) -> None:
        """Hold a received message until the emulated link would have delivered it."""
        link = self._links.get(source)
        if link is None:
            return
        latency, bw = link
        start = max(sent_ns * 1e-9, self._link_free.get(source, 0.0))
        done = start + nbytes / bw
        self._link_free[source] = done
        delay = done + latency - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    # -- control data (pickled, small) -------------------------------------------------------
    def barrier(self) -> None:
        self._wait([self.comm.Ibarrier()])

    def bcast(self, obj=None, root: int = 0):
        """Broadcast a small object once the root is ready; the others wait without spinning."""
        self.barrier()
        return self.comm.bcast(obj, root=root)

    def gather(self, obj, root: int = 0):
        self.barrier()
        return self.comm.gather(obj, root=root)

    def abort(self, code: int = 1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)

    # -- tensors -------------------------------------------------------------------------------
    def send(self, dest: int, kind: int, fields=(), buffers=(), wait: bool = True) -> None:
        """Send a header with `fields` (ints), then each of `buffers` (tensors of up to 3 dims).

        wait=False returns at once: the buffers are held until MPI is done with them, and finished
        sends are cleared on later calls (or by flush()), so a stage can receive while it sends.
        """
        tag = _TAG_TOKENS if kind == TOKENS else _TAG_PIPE
        if len(fields) > MAX_FIELDS or len(buffers) > MAX_BUFFERS:
            raise ValueError(f"a message carries at most {MAX_FIELDS} fields and {MAX_BUFFERS} buffers")
        header = np.zeros(_HEADER, dtype=np.int64)
        header[:4] = kind, time.monotonic_ns(), len(fields), len(buffers)
        header[4:4 + len(fields)] = fields
        bufs = []
        for i, t in enumerate(buffers):
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()  # stage through host memory for MPI
            t = t.contiguous()
            if t.ndim > _MAX_NDIM:
                raise ValueError(f"tensor messages carry at most {_MAX_NDIM} dims, got {tuple(t.shape)}")
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor messages carry {', '.join(map(str, _DTYPES))}, not {t.dtype}")
            at = 4 + MAX_FIELDS + i * (2 + _MAX_NDIM)
            header[at:at + 2 + t.ndim] = [_DTYPES.index(t.dtype), t.ndim, *t.shape]
            bufs.append((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())
        requests = [self.comm.Isend(header, dest=dest, tag=tag)]
        requests += [self.comm.Isend(b, dest=dest, tag=tag) for b in bufs]
        self._pending = [p for p in self._pending if not MPI.Request.Testall(p[0])]
        if wait:
            self._wait(requests, peer=dest)
        else:
            self._pending.append((requests, (header, bufs), dest))

    def flush(self) -> None:
        """Wait for every send still in flight (and drop liveness checks still open)."""
        for requests, _, dest in self._pending:
            self._wait(requests, peer=dest)
        self._pending = []
        self._drop_checks()

    def recv(self, source: int, kind_expected: int | None = None) -> Message:
        """Receive one message from `source` (header, then the buffers the header announces)."""
        tag = _TAG_TOKENS if kind_expected == TOKENS else _TAG_PIPE
        header = np.empty(_HEADER, dtype=np.int64)
        self._wait([self.comm.Irecv(header, source=source, tag=tag)], peer=source)
        kind, sent_ns, nfields, nbufs = (int(x) for x in header[:4])
        msg = Message(kind, [int(x) for x in header[4:4 + nfields]])
        nbytes = header.nbytes
        for i in range(nbufs):
            at = 4 + MAX_FIELDS + i * (2 + _MAX_NDIM)
            dtype, ndim = _DTYPES[int(header[at])], int(header[at + 1])
            arr = np.empty(tuple(int(x) for x in header[at + 2:at + 2 + ndim]), dtype=_NP[dtype])
            self._wait([self.comm.Irecv(arr, source=source, tag=tag)], peer=source)
            nbytes += arr.nbytes
            t = torch.from_numpy(arr)
            msg.buffers.append(t.view(torch.bfloat16) if dtype == torch.bfloat16 else t)
        if self._links:
            self._deliver(source, sent_ns, nbytes)
        return msg


def versions() -> dict:
    """Versions of what a run depends on, the MPI library's included (kept with results and profiles)."""
    import h5py
    import mpi4py
    import transformers

    from . import __version__

    return {"edgeshard_mpi": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "mpi4py": mpi4py.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(), "python": sys.version.split()[0]}
