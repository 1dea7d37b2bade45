"""Process-group helpers for runs launched with ``torchrun`` (one process per device).

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them, joins the group (gloo on CPU, nccl
on CUDA with device ``cuda:LOCAL_RANK``) and hands back a :class:`DistContext`. Without
those variables (or with ``WORLD_SIZE=1``) it is a no-op and every method of the context
does the single-process thing, so callers never branch on "am I distributed".

A low module: it imports only :mod:`ood_audit.errors`, :mod:`ood_audit.faults` and
:mod:`ood_audit.torchrun_env`, so training and scoring can all use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as tdist

from .errors import UserError
from .faults import PeerFault, what_failed
from .torchrun_env import dist_env

_CONTEXT: DistContext | None = None


@dataclass
class DistContext:
    """Who this process is in the group, and the few collectives the package needs.

    ``device`` is the device this rank computes on (``cuda:LOCAL_RANK`` under nccl).
    Every collective is a no-op (or the identity) when ``world == 1``.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (single process)
    owns_group: bool = False  # True when init_distributed created the group, so close() may end it

    @property
    def is_main(self) -> bool:
        """Rank 0 prints progress and summaries and renames finished outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.backend == "nccl":
            # nccl barriers need the device, else they guess one and may hang on multi-GPU hosts
            tdist.barrier(device_ids=[self.device.index or 0])
        else:
            tdist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (it must live on ``self.device`` under nccl);
        returns it for chaining."""
        if self.distributed:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (picklable objects only)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def agree(self, failure: BaseException | None) -> None:
        """Stop every rank when any rank failed: call it at the same point on every rank,
        with what this one raised there (None: it went well).

        The rank that failed raises its own error again; the others raise the first
        failed rank's, as the line every rank prints: a
        :class:`~ood_audit.faults.PeerFault` for a fault of the machine (each rank's own
        ``keeping`` notes add what was kept), a UserError with the same message for a
        user error, else a UserError naming the rank (whose traceback is the bug's).
        Without a group it only re-raises ``failure``. A rank that fails without reaching the
        call leaves the others waiting: put the calls where every rank comes.
        """
        lines = self.all_gather_object(None if failure is None else _shared_line(failure)) \
            if self.distributed else []
        if failure is not None:
            raise failure
        for rank, line in enumerate(lines):
            if line is not None:
                kind, what, advice = line
                if kind == "fault":
                    raise PeerFault(what, advice)
                if kind == "user":
                    raise UserError(what)
                raise UserError(f"rank {rank} of {self.world} stopped: {what}")

    def close(self) -> None:
        """Leave the group if we created it (idempotent); later init_distributed calls rejoin."""
        global _CONTEXT
        if self.owns_group and tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        self.owns_group = False
        if _CONTEXT is self:
            _CONTEXT = None

    def _object_device(self) -> torch.device | None:
        # object collectives pickle into a tensor; nccl needs it on this rank's GPU
        return self.device if self.backend == "nccl" else None


def _shared_line(exc: BaseException) -> tuple[str, str, str | None]:
    """(kind, text, advice) of a rank's failure, sent to the other ranks (picklable)."""
    failed = what_failed(exc)
    if failed is not None:
        return "fault", failed[0], failed[1]
    if isinstance(exc, UserError):
        return "user", str(exc), None
    return "bug", f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}", None


def _resolve_device(device: str | torch.device, local_rank: int, distributed: bool) -> torch.device:
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind == "cuda" and distributed:
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} under torchrun, but torch sees no CUDA GPU; use --device cpu")
        if index and int(index) != local_rank:
            # one process per GPU: torchrun's LOCAL_RANK, not the flag, picks the GPU
            raise UserError(f"--device {name} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda")
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init_distributed(device: str | torch.device = "auto") -> DistContext:
    """Join the torchrun process group (idempotent) and return this rank's context.

    No-op when ``WORLD_SIZE`` is unset or 1: the context says rank 0 of 1 on ``device``.
    A second call returns the same context; if someone else already initialised the
    default group, we use it and leave it to them to destroy.
    """
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    rank, world, local_rank = dist_env()
    dev = _resolve_device(device, local_rank, world > 1)
    if world == 1:
        _CONTEXT = DistContext(device=dev)
        return _CONTEXT
    if not tdist.is_available():
        raise UserError("WORLD_SIZE>1 but this torch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if tdist.is_initialized():
        backend = tdist.get_backend()
    else:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UserError(f"WORLD_SIZE={world} but {var} is unset; launch with torchrun")
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator eagerly, avoids device guessing
        tdist.init_process_group(**kwargs)
        owns = True
    _CONTEXT = DistContext(rank=rank, world=world, local_rank=local_rank, device=dev,
                           backend=backend, owns_group=owns)
    return _CONTEXT


def current() -> DistContext:
    """The context of the last :func:`init_distributed`, or a single-process one on CPU."""
    return _CONTEXT if _CONTEXT is not None else DistContext()
