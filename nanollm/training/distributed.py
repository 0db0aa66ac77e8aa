"""Data-parallel process groups: join the one torchrun describes, and the few collectives training needs.

`torchrun --nproc_per_node N nanollm pretrain` starts N processes with RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `Distributed.from_env()` joins them (NCCL on CUDA,
gloo on CPU). Without those variables everything here is a no-op for a single process.
Which rows of a batch a rank trains on is decided in nanollm/training/loop.py.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanollm.errors import NanollmError, first_line

log = logging.getLogger(__name__)

# How long a rank waits in a collective before giving up. Rank 0 writes checkpoints while the
# others wait at the next collective; 30 min covers a multi-GB checkpoint on a slow disk. A
# process that dies (killed, its node down) closes its sockets and the others fail at once;
# only a silent loss (a cut network) waits this long.
_TIMEOUT = datetime.timedelta(minutes=30)


def lost_the_job(err: BaseException) -> str | None:
    """What broke, when `err` is a collective failing because another process of the job is gone; else None.

    torch raises DistError (NCCL, the rendezvous store) or, from gloo, a RuntimeError whose text
    names its transport ("[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset
    by peer. This is typically caused by ..."): the reason is that text's first sentence.
    """
    text = first_line(err)
    if not isinstance(err, dist.DistError) and not (isinstance(err, RuntimeError) and "gloo" in text):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # the C++ source location
    return text.split(". ")[0].rstrip(".")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank among world_size, and local_rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs metrics and talks to MLflow."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Distributed:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process when they are absent."""
        env = os.environ if env is None else env
        try:
            rank, world, local = (int(env.get(k, default)) for k, default in
                                  (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))  # fmt: skip
        except ValueError:
            raise NanollmError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/"
                f"{env.get('LOCAL_RANK')!r}; start distributed runs with torchrun"
            ) from None
        if not 0 <= rank < world:
            raise NanollmError(f"RANK {rank} is outside WORLD_SIZE {world}; start distributed runs with torchrun")
        return cls(rank, world, local)

    def init(self, device: torch.device) -> None:
        """Join the process group (env:// rendezvous from torchrun's variables); no-op for one process."""
        if not self.enabled or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=_TIMEOUT, device_id=device if device.type == "cuda" else None)
        log.info("rank %d of %d joined the %s process group", self.rank, self.world_size, backend)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------- collectives

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (in place, also returned); gloo has no AVG, so callers divide."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for the resume state, once per run)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def split_evenly(n: int, parts: int, index: int) -> range:
    """Indices of the index-th of `parts` contiguous, equal shares of range(n) (n divisible by parts)."""
    share = n // parts
    return range(index * share, (index + 1) * share)
