"""Tensor parallelism's collectives (all-reduce, all-gather): through shared memory for
ranks on one host (kernels/shm_allreduce.c), where gloo would go through sockets and
thread hand-offs (two all-reduces a layer of one token's hidden state cost gloo
hundreds of microseconds each on a small machine, BENCHMARKS.md), else over gloo.

The segment is a file in /dev/shm that the driver creates and unlinks once every rank
has mapped it, so that nothing is left behind whatever happens to the ranks after.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import uuid
from functools import cache
from pathlib import Path

import torch
import torch.distributed as dist

from llmopt.distributed import group
from llmopt.distributed.group import DRIVER, Ranks

SHM = Path("/dev/shm")
SLOT_BYTES = 2 << 20  # a rank's vector per call: a 512-token chunk of 1,024 fp32 values
_FLAG_BYTES = 64  # kernels/shm_allreduce.c's FLAG_BYTES
_SHM_DTYPES = (torch.float32, torch.bfloat16)


@cache
def _kernel():
    """kernels/shm_allreduce.c, or None without a C compiler."""
    from llmopt.kernels.build import function

    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    # base, rank, world, seq, x, n, bf16, slot, pids, timeout_s
    return function("shm_allreduce", [p, i32, i32, i64, p, i32, i32, i64, p, ctypes.c_double], i32)


@cache
def _gather_kernel():
    """kernels/shm_allreduce.c's shm_allgather."""
    from llmopt.kernels.build import function

    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    # base, rank, world, seq, x, bytes, out, out_stride, slot, pids, timeout_s
    argtypes = [p, i32, i32, i64, p, i64, p, i64, i64, p, ctypes.c_double]
    return function("shm_allreduce", argtypes, i32, symbol="shm_allgather")


def _host() -> str:
    """This host (and boot): ranks with the same one share /dev/shm."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname() + (boot.read_text().strip() if boot.exists() else "")


class ShmCollectives:
    """The ranks' collectives through one shared segment (every rank calls the same
    ones in the same order)."""

    def __init__(self, segment: mmap.mmap, ranks: Ranks, pids: list[int], slot: int) -> None:
        self.segment, self.rank, self.world, self.slot = segment, ranks.rank, ranks.world, slot
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(segment))
        self.pids = (ctypes.c_int * len(pids))(*pids)
        self.seq = 0

    @classmethod
    def open(cls, ranks: Ranks, slot: int = SLOT_BYTES) -> ShmCollectives | None:
        """Every rank calls it (a collective): the shared all-reduce, or None where the
        ranks are not all on this host or the kernel does not build."""
        mine = (_host() if SHM.is_dir() and _kernel() is not None else None, os.getpid())
        everyone: list = [None] * ranks.world
        dist.all_gather_object(everyone, mine, group=ranks.compute)
        if any(host is None or host != everyone[0][0] for host, _ in everyone):
            return None
        size = ranks.world * _FLAG_BYTES + 2 * ranks.world * slot
        name = [str(SHM / f"llmopt-{uuid.uuid4().hex}")]
        if ranks.rank == DRIVER:
            with open(name[0], "wb") as f:
                f.truncate(size)  # zeros: every flag at 0
        dist.broadcast_object_list(name, src=DRIVER, group=ranks.compute)
        with open(name[0], "r+b") as f:
            segment = mmap.mmap(f.fileno(), size)
        dist.barrier(group=ranks.compute)
        if ranks.rank == DRIVER:
            os.unlink(name[0])
        return cls(segment, ranks, [pid for _, pid in everyone], slot)

    def __call__(self, x: torch.Tensor) -> None:
        """x summed over the ranks, in place (contiguous fp32 or bf16)."""
        assert x.is_contiguous() and x.dtype in _SHM_DTYPES
        flat, fn, bf16 = x.view(-1), _kernel(), int(x.dtype == torch.bfloat16)
        per_call = self.slot // x.element_size()
        for lo in range(0, flat.numel(), per_call):
            n = min(per_call, flat.numel() - lo)
            rc = fn(self.base, self.rank, self.world, self._next(), flat[lo:].data_ptr(), n,
                    bf16, self.slot, self.pids, group.COLLECTIVE_TIMEOUT_S)  # fmt: skip
            _check(rc)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(world, *x.shape): every rank's x, in rank order (x contiguous)."""
        flat, fn = x.reshape(-1).view(torch.uint8), _gather_kernel()
        out = x.new_empty((self.world, *x.shape))
        rows = out.view(self.world, -1).view(torch.uint8)  # (world, bytes)
        for lo in range(0, flat.numel(), self.slot):
            n = min(self.slot, flat.numel() - lo)
            rc = fn(self.base, self.rank, self.world, self._next(), flat[lo:].data_ptr(), n,
                    rows[0, lo:].data_ptr(), rows.stride(0), self.slot, self.pids,
                    group.COLLECTIVE_TIMEOUT_S)  # fmt: skip
            _check(rc)
        return out

    def _next(self) -> int:
        self.seq += 1
        return self.seq


def _check(rc: int) -> None:
    if rc == -1:
        raise RuntimeError("shared-memory collective timed out")
    if rc == -2:
        raise RuntimeError("Connection closed by peer: a rank's process is gone")
    assert rc == 0, rc


class Collectives:
    """Sum and concatenation over the ranks: through shared memory where they share a
    host, else over the compute group (gloo). Every rank takes the same path."""

    def __init__(self, ranks: Ranks) -> None:
        self.group, self.world = ranks.compute, ranks.world
        self.shm = ShmCollectives.open(ranks)

    def __call__(self, x: torch.Tensor) -> None:
        if self.shm is not None and x.is_contiguous() and x.dtype in _SHM_DTYPES:
            self.shm(x)
        else:
            dist.all_reduce(x, group=self.group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(N, k) this rank's columns -> (N, world * k) every rank's, in rank order."""
        x = x.contiguous()
        if self.shm is not None:
            parts = list(self.shm.gather(x).unbind(0))
        else:
            parts = [torch.empty_like(x) for _ in range(self.world)]
            dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)
