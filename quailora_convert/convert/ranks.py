"""Several processes converting one model together (torch.distributed, started by torchrun), or one alone.

    torchrun --nproc-per-node N --no-python quailora-convert MODEL ...

starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set
(several nodes: torchrun's own rendezvous). The design follows llm-compressor's distributed oneshot
(data-parallel calibration, weight-parallel optimisation; vllm-project/llm-compressor#2180):

- every rank calibrates on its share of the batches (spread by padded positions, the longest to the least
  loaded rank) and keeps only its share of the hidden states;
- each input group's H sum is reduced to the rank that owns the group (groups are spread over the ranks
  by solve cost), with the token counts summed everywhere;
- the owner quantizes and solves the group's modules, and rank 0 gathers the results and alone writes
  the bundle, the report and the resume state, in the single-process order (the same bytes);
- a step that fails on any rank fails on every rank (together()): rank 0 prints the one line.

A world of one (no WORLD_SIZE) runs the same code with no collectives.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, ContextManager, TypeVar

import torch

from ..errors import SHARED_MARK, BadInputError, PeerFailed, QuailoraError
from ..stopping import critical, stop_request, take_held_signal

T = TypeVar("T")
# How long a rank waits in a collective for the others: one layer's reads and solves on a 70B model on one
# rank (torch's default for NCCL is 10 minutes). A rank that died is noticed sooner: torchrun stops the rest.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass
class Ranks:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this object initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, costs: list[float]) -> list[int]:
        """Indices of this rank's items (batches), in order, spread over the ranks by cost (owners): the
        calibration batches, longest first, by padded positions, so that no rank waits on the longest batches."""
        return [item for item, owner in enumerate(self.owners(costs)) if owner == self.rank]

    def owners(self, costs: list[float]) -> list[int]:
        """A rank for each item, largest cost first to the least loaded rank (ties: the lower rank)."""
        load = [0.0] * self.size
        owner = [0] * len(costs)
        for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            chosen = min(range(self.size), key=lambda r: (load[r], r))
            owner[item] = chosen
            load[chosen] += costs[item]
        return owner

    # -- collectives (no-ops in a world of one) ------------------------------------------------
    def reduce_sum(self, tensor: torch.Tensor, owner: int) -> None:
        """tensor summed over the ranks into the owner's copy (the others' copies are left undefined)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM)

    def all_sum(self, values: list[int]) -> list[int]:
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) for v in tensor.tolist()]

    def gather(self, value: object) -> list[object] | None:
        """Every rank's value, in rank order, on rank 0; None elsewhere."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.size if self.main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def all_gather(self, value: object) -> list[object]:
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def from_main(self, value: object) -> object:
        """Rank 0's value on every rank."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def together(self, step: Callable[[], T]) -> T:
        """step() on every rank; when it raised on any rank, raise on all: a rank's own error where it
        failed, PeerFailed elsewhere (the first failing rank's message). Every rank must call it at the
        same point. With several ranks, stop signals are held back between these points (held_signals)
        and a signal any rank got stops every rank here, all at the same point."""
        error: BaseException | None = None
        result = None
        try:
            result = step()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = e
        if self.size > 1:
            held = take_held_signal()
            outcomes = self.all_gather((None if error is None else _describe(self.rank, error), held))
            first = next((failure for failure, _ in outcomes if failure is not None), None)
            if error is None and first is not None:
                error = PeerFailed(*first)
            elif error is None:
                signum = next((signal for _, signal in outcomes if signal is not None), None)
                if signum is not None:
                    error = stop_request(signum)
            if error is not None:
                setattr(error, SHARED_MARK, True)  # every rank stops here: they may part together (close)
        if error is not None:
            raise error
        return result

    def on_main(self, step: Callable[[], T], elsewhere: T | None = None) -> T | None:
        """step() on rank 0 alone, under together() (its error ends every rank); the other ranks get elsewhere."""
        return self.together(lambda: step() if self.main else elsewhere)

    def main_result(self, step: Callable[[], T]) -> T:
        """step() on rank 0 alone, its result on every rank (on_main, then from_main)."""
        return self.from_main(self.on_main(step))

    def held_signals(self) -> ContextManager[None]:
        """Around a whole run with several ranks: stop signals wait for the next together(), where every
        rank stops at once (a rank stopped alone would leave the others waiting in a collective)."""
        return critical(finishes=True) if self.size > 1 else nullcontext()

    def close(self, error: BaseException | None = None) -> None:
        """Leave the process group. Every rank got here together (no error, or one that together() shared:
        a stop signal, a failure all ranks heard of), so they first wait for each other: a rank that tore
        gloo down while a peer still held a connection to it was seen to abort at exit (SIGABRT, "terminate
        called without an active exception"), in CI, after a run and after a stop. After an error of this
        rank's alone no barrier: it must not wait on peers that may never arrive."""
        if self.owns_group:
            import torch.distributed as dist

            if self.size > 1 and (error is None or getattr(error, SHARED_MARK, False)):
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _describe(rank: int, error: BaseException) -> tuple[str, int]:
    from ..stopping import StopRequested, stop_behind

    stop = stop_behind(error)
    if isinstance(stop, StopRequested):
        return f"rank {rank} was stopped ({stop})", stop.exit_code
    text = str(error) if isinstance(error, QuailoraError) else f"{type(error).__name__}: {error}"
    return f"on rank {rank}: {text}", 2 if isinstance(error, QuailoraError) else 1


def join_ranks(device: torch.device) -> Ranks:
    """The ranks torchrun started (WORLD_SIZE > 1: the process group is initialised here, gloo on CPU,
    NCCL on CUDA with one GPU per local rank), else a world of one on device."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return Ranks(0, 1, device)
    import torch.distributed as dist

    if not dist.is_available():
        raise BadInputError("WORLD_SIZE is set (torchrun) but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if dist.get_world_size() != size:
        raise BadInputError(f"WORLD_SIZE {size} but the process group has {dist.get_world_size()} ranks")
    return Ranks(dist.get_rank(), size, device, owns)
