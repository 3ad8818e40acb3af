"""Data-parallel training on several processes, GPUs and machines, with PyTorch's own engine.

`cnn-train --nproc N` (or `torchrun --nproc-per-node N -m trainer.cli ...`) starts N copies of
the same training code. Each copy reads its place in the group from the variables torchrun
sets (RANK, WORLD_SIZE, ...) as a `World`. Without torchrun the World is one process and every
collective below returns its input untouched, so one process runs the code it always ran.

What makes N processes compute what one process computes:
- the recipe's batch size is the global batch: every rank draws the same seeded permutation
  and takes its own B/N rows of each global batch (`World.batch_rows`);
- DistributedDataParallel averages over ranks the gradients of their B/N-row mean losses,
  which is the gradient of the B-row mean loss;
- augmentation and dropout draw for the whole global batch from generators keyed by
  (seed, epoch, step) and keep their rows (trainer.augment);
- evaluation is sharded, and its sums and predictions are combined (`sum`, `gather_rows`).
What cannot match is the order of float reductions (a sum over B rows vs two sums over B/2
rows added), so N-process weights equal one process's to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from serving.cores import usable_cores
from trainer.recipe import RecipeError

log = logging.getLogger("convserve.train")

# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers; older torch has the old name.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process unless torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    restart: int = 0  # how many times torchrun has restarted the group after a failure
    launched: bool = False  # started by torchrun: joins a process group

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        return cls(
            rank=int(env["RANK"]),
            size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            launched=True,
        )

    @property
    def is_main(self) -> bool:
        """Rank 0 alone shows progress, writes logs and checkpoints, exports and reports."""
        return self.rank == 0

    @property
    def joined(self) -> bool:
        return self.launched and dist.is_available() and dist.is_initialized()

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: on GPU machines, one GPU per local rank."""
        if device.type == "cuda" and self.launched:
            return torch.device("cuda", self.local_rank)
        return device

    # -- which rows are mine ----------------------------------------------------------
    def batch_rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch: rank r takes [r*B/N, (r+1)*B/N)."""
        if batch_size % self.size:
            raise RecipeError(
                f"train.batch_size={batch_size} is the global batch and must be divisible by "
                f"the number of processes ({self.size}); choose a multiple of {self.size}"
            )
        b = batch_size // self.size
        return slice(self.rank * b, (self.rank + 1) * b)

    def shard(self, n: int, rank: int | None = None) -> slice:
        """A contiguous share of n rows (sizes differ by at most one) for evaluation."""
        r = self.rank if rank is None else rank
        return slice(n * r // self.size, n * (r + 1) // self.size)

    # -- collectives: no-ops for one process -------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (in place)."""
        if self.joined:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is true on any rank, so all ranks take the same branch."""
        if not self.joined:
            return flag
        return bool(self.sum(torch.tensor(int(flag), device=device)) > 0)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over ranks (a copy; one process gets `t` itself)."""
        if not self.joined:
            return t
        return self.sum(t.clone()) / self.size

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `shard(n)` rows of a result, put back together in row order."""
        if not self.joined:
            return t
        width = -(-n // self.size)  # all_gather wants equal sizes: pad each shard to the largest
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        lengths = [len(range(n)[self.shard(n, r)]) for r in range(self.size)]
        return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)])

    @torch.no_grad()
    def average_batchnorm_stats(self, modules: Sequence[nn.Module]) -> None:
        """Average the running mean/var of every batch norm over ranks.

        Without SyncBatchNorm each rank normalises with its own batch statistics and so keeps
        its own running estimates; averaging them before evaluation and checkpoints gives every
        rank the same model (and estimates from all the data, not one rank's share).
        """
        if not self.joined:
            return
        stats = [
            buf
            for module in modules
            for bn in module.modules()
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats
            for buf in (bn.running_mean, bn.running_var)
        ]
        if stats:
            flat = torch.cat([s.flatten() for s in stats])
            self.sum(flat).div_(self.size)
            for buf, avg in zip(stats, flat.split([s.numel() for s in stats]), strict=True):
                buf.copy_(avg.view_as(buf))

    def barrier(self) -> None:
        if self.joined:
            dist.barrier()

    def data_parallel(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Under torchrun, DDP averages the gradients over ranks during the backward pass."""
        if not self.joined:
            return model
        # Buffers are not broadcast from rank 0 at every forward: the only buffers that move
        # are batch-norm statistics, which are averaged once per epoch instead.
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)


ONE_PROCESS = World()  # no torchrun: every collective is a no-op


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the duration of a run (gloo on CPU, NCCL on GPU)."""
    if not world.launched:
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield world
    except BaseException:
        # No barrier: a failing rank's peers may never reach one. torchrun stops them.
        dist.destroy_process_group()
        raise
    # Everyone finishes before anyone tears the group down (gloo aborts the process otherwise).
    dist.barrier()
    dist.destroy_process_group()


def end_rank(code: int) -> NoReturn:
    """End a torchrun rank with `code` without finalizing the interpreter.

    `destroy_process_group` does not stop gloo's worker threads (the C++ group outlives it),
    and one may still be dropping its reference to a tensor of the last collective, a tensor
    Python has already let go of. At torch 2.13 that release takes the GIL; a thread that asks
    for the GIL while the interpreter finalizes is ended by `pthread_exit`, whose unwinding
    through the release aborts the process ("terminate called without an active exception",
    exit -6; a core dump of rank 1 shows `ProcessGroupGloo::AsyncWork::~AsyncWork` in
    `gil_scoped_acquire` beside `Py_FinalizeEx`). The barrier cannot prevent it: the group has
    two worker threads, and the barrier may run on the other. So a rank does not finalize:
    what it wrote is closed by now; the exit handlers run here (logging's flush, temporary
    folders' removal), then the standard streams are flushed and the process ends.
    """
    atexit._run_exitfuncs()  # what finalizing runs first, with the interpreter whole
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# ----------------------------------------------------------------------------- launching
@dataclass(frozen=True)
class LaunchOptions:
    """The torchrun options `cnn-train` passes through."""

    nproc: int
    nnodes: str = "1"
    max_restarts: int = 0
    rdzv_backend: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_conf: str | None = None
    local_addr: str | None = None  # this machine's address as the others reach it

    def torchrun_args(self) -> list[str]:
        args = ["--nproc-per-node", str(self.nproc), "--nnodes", self.nnodes]
        args += ["--max-restarts", str(self.max_restarts)]
        for flag, value in (
            ("--rdzv-backend", self.rdzv_backend),
            ("--rdzv-endpoint", self.rdzv_endpoint),
            ("--rdzv-id", self.rdzv_id),
            ("--rdzv-conf", self.rdzv_conf),
            ("--local-addr", self.local_addr),
        ):
            if value:
                args += [flag, value]
        # Without an endpoint on one node torchrun picks a free local port (c10d on localhost).
        return args

    @property
    def fixed_world_size(self) -> int | None:
        """Processes in all, when --nnodes is one number (not an elastic MIN:MAX range)."""
        return self.nproc * int(self.nnodes) if self.nnodes.isdigit() else None


def launch(options: LaunchOptions, module: str, argv: Sequence[str]) -> int:
    """Run `python -m module argv` on `options.nproc` processes per node under torchrun.

    The agent restarts the whole group (up to --max-restarts times) when a worker fails; the
    restarted workers see TORCHELASTIC_RESTART_COUNT > 0 and resume from the last checkpoint.
    Returns the first failed worker's exit code, or 0.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # Each rank sets its own thread count (cores / local ranks); setting it here as well keeps
    # torchrun from warning that it chose 1 thread for us.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // options.nproc)))
    # By default the restarted workers share the rendezvous store with the failed attempt's,
    # and gloo/NCCL can read a dead worker's address from it and hang or fail to connect
    # (pytorch/pytorch#135712): give every attempt a store of its own.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun_main([*options.torchrun_args(), "-m", module, *argv])
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
