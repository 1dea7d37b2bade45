"""Who this process is under ``torchrun``, from its environment alone (no torch), so the
CLI can tell rank 0, which speaks for the run, before anything heavy is imported."""

from __future__ import annotations

import os

from .errors import UserError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; "
                        "launch with torchrun or unset it") from None


def dist_env() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` from the torchrun environment; ``(0, 1, 0)`` when unset."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent; launch with torchrun")
    return rank, world, local_rank
