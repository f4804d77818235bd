"""One distributed helper for training and embedding (torchrun: RANK, WORLD_SIZE, LOCAL_RANK).

* :func:`from_env` parses the environment; :func:`session` resolves each rank's device
  (CUDA: GPU ``LOCAL_RANK``), starts the process group (NCCL on CUDA, gloo on CPU) and
  always tears it down.
* :func:`agree_on_errors` makes every rank learn that one failed, so none waits forever
  at a collective: rank 0 reports the message, the others exit quietly with status 2.
* :func:`rank_zero_first` runs a step (building the image cache) on rank 0 while the
  other ranks wait, then on the others — who find the finished cache and only map it.
* :func:`any_rank_host` agrees on flags (stop now?) every step over a CPU gloo group (no GPU
  wait); :func:`any_rank` agrees on a flag held on the device (a NaN seen on the GPU), on log steps.
* A rank whose peer died (a crash, a kill -9) fails its next collective: :func:`session` turns
  that into :class:`PeerLost`, one line naming the rank and what to do next, not a gloo traceback.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch

from deepranking import cli, runtime
from deepranking.cli import UserError

T = TypeVar("T")
# Rank 0 alone decodes the image cache, validates and writes checkpoints while the other ranks
# wait at their next collective: NCCL's default 10 minutes is too short for a large cache.
TIMEOUT = timedelta(hours=3)
_HOST_GROUP = None  # the gloo group of the current session (see session)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_env(environ=os.environ) -> DistEnv:
    """The torchrun variables (absent: one process)."""
    try:
        rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"invalid RANK={rank} / WORLD_SIZE={world}")
    return DistEnv(rank, world, local)


def rank_device(name: str, env: DistEnv) -> torch.device:
    """--device resolved for this rank: under torchrun, ``auto``/``cuda`` mean GPU LOCAL_RANK."""
    device = runtime.pick_device(name)
    if env.active and device.type == "cuda" and device.index is None:
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {env.rank} needs GPU {env.local_rank} but only "
                            f"{torch.cuda.device_count()} are visible")
        device = torch.device("cuda", env.local_rank)
    return device


class PeerLost(UserError):
    """A collective failed because another rank is gone (it crashed, was killed, or stopped)."""


# What gloo and NCCL say when the other end of a collective has gone away.
_PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo/transport",
                    "Socket Timeout", "NCCL communicator", "ProcessGroupNCCL")


def lost_contact(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank is gone."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _PEER_LOST_SIGNS)


def peer_lost(env: DistEnv, exc: BaseException, hint: str) -> PeerLost:
    """The one line for a lost peer: this rank, the backend's own reason (its first sentence, without
    the source location), and ``hint`` (the checkpoint to resume from)."""
    import re

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason).split(". ")[0].rstrip(".")
    return PeerLost(f"rank {env.rank} of {env.world_size}: lost contact with the other ranks ({reason}): "
                    f"another rank stopped or died; {hint}")


@contextlib.contextmanager
def session(env: DistEnv, device: torch.device, hint: Callable[[], str] | None = None) -> Iterator[None]:
    """The process group for the duration of the block (nothing to do for one process).

    A collective that fails because another rank is gone raises :class:`PeerLost` (a UserError:
    one line, exit 2) ending with ``hint()`` (e.g. "continue with --resume temp_3.model")."""
    if not env.active:
        yield
        return
    import torch.distributed as dist

    global _HOST_GROUP
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size,
                            timeout=TIMEOUT)
    lost = False
    try:
        # Flags the ranks agree on every step (stop now?) travel over gloo on the CPU: a message
        # between processes, never a wait for the GPU.
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=TIMEOUT)
        yield
    except Exception as exc:
        if not lost_contact(exc):
            raise
        lost = True
        raise peer_lost(env, exc, hint() if hint is not None else "run the command again") from None
    finally:
        _HOST_GROUP = None
        try:
            dist.destroy_process_group()
        except Exception:
            if not lost:  # after a lost peer the teardown may fail too: the line above says why
                raise


def agree_on_errors(env: DistEnv, error: str | None) -> None:
    """Raise on every rank if any rank failed (rank 0: UserError with the first message)."""
    if not env.active:
        if error is not None:
            raise UserError(error)
        return
    import torch.distributed as dist

    errors: list = [None] * env.world_size
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if env.main:
        raise UserError(first)
    raise SystemExit(cli.EXIT_USER_ERROR)


def run_agreed(env: DistEnv, fn: Callable[[], T]) -> T:
    """``fn()`` on every rank; a UserError on any rank stops all of them (see agree_on_errors)."""
    result, error = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    agree_on_errors(env, error)
    return result


def rank_zero_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then (once it succeeded) on the other ranks.

    For the image cache: rank 0 decodes every image into the cache entry while the others
    wait; they then find the complete entry and only memory-map it (one decode, not N racing).
    """
    if not env.active:
        return fn()
    result = run_agreed(env, fn) if env.main else None
    if not env.main:
        agree_on_errors(env, None)  # pairs with rank 0's agreement: rank 0 finished (or failed)
    other = run_agreed(env, fn) if not env.main else None
    if env.main:
        agree_on_errors(env, None)  # pairs with the other ranks' run
    return result if env.main else other


def any_rank_host(env: DistEnv, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks, through the CPU (gloo) group: cheap enough for every step."""
    if not env.active:
        return tuple(bool(f) for f in flags)
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return tuple(bool(v > 0) for v in t.tolist())


def any_rank(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective: call it on all ranks)."""
    if not env.active:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather(env: DistEnv, obj) -> list:
    """[obj of rank 0, ..., obj of rank W-1] on every rank."""
    if not env.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.active:
        import torch.distributed as dist

        dist.barrier()


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Contiguous shard boundaries: rank r handles [b[r], b[r+1]) of n items."""
    return [n * r // world_size for r in range(world_size + 1)]
