"""Several processes, one run: the launch as `accelerate launch` or `torchrun` describe it, and what the processes
must agree on.

The engines are accelerate's (the process group, DDP, FSDP2) and torch.distributed's (NCCL on GPUs, gloo on CPU);
this module reads the launch from the environment they set, picks the strategy (`distributed=auto|none|ddp|fsdp`)
and holds the few collective calls the run makes itself: a barrier around the files rank 0 writes, and a check that
every process chose the same thing (the checkpoint to resume) before any of them trains on it.
"""

from __future__ import annotations

import os

from finetune.errors import UserError

def world_size() -> int:
    """Processes in this launch (WORLD_SIZE, set by torchrun and accelerate launch); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes the run's files (checkpoints, logs, plots, reports, the adapter, exports)."""
    return rank() == 0


def strategy(name: str, processes: int | None = None) -> str:
    """none, ddp or fsdp for a launch of ``processes`` (default: this one's) under ``distributed=name``."""
    processes = world_size() if processes is None else processes
    if name == "auto":
        return "ddp" if processes > 1 else "none"
    if name == "none" and processes > 1:
        raise UserError(f"distributed=none, but this launch started {processes} processes: use distributed=ddp (or "
                        "auto) to train on all of them, or launch one process")
    return name if processes > 1 else "none"


def start(cpu: bool) -> None:
    """Join the launch's process group (accelerate's state: gloo on CPU, NCCL on GPUs); nothing for one process."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu)


def _group():
    import torch.distributed as dist

    return dist if world_size() > 1 and dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def agree(value, what: str) -> None:
    """Every process must have chosen the same ``value``; otherwise each stops with a line naming what differs."""
    dist = _group()
    if dist is None:
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        seen = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise UserError(f"the processes disagree on {what} ({seen}): every node must see the same run directory "
                        "at the same path (a shared file system, or copy the run directory to the other nodes "
                        "before launching)")


def any_true(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (a signal that reached only some of them stops all at the same step)."""
    dist = _group()
    if dist is None:
        return flag
    import torch

    backend = dist.get_backend()
    device = "cuda" if backend == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def frozen_names(model) -> list[str]:
    """Every parameter and buffer name that is not trained: DDP neither broadcasts nor reduces them (each process
    loaded the same base; at 26B a start-up broadcast would move 51 GB for nothing)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
    return names + [n for n, _ in model.named_buffers(remove_duplicate=False)]


def shard_frozen(model) -> None:
    """FSDP2 over the frozen base: each encoder layer and its weight-tied decoder twin sharded as one unit (their
    tensors are the same objects: two units would split the tie), then the rest at the root. The LoRA weights stay
    whole on every process (``ignored_params``): their gradients are averaged by DDP like any replicated model's, so
    checkpoints, resume and the adapter are those of a DDP run, and only the base (the 52 GB) is divided."""
    from torch.distributed.fsdp import fully_shard

    from finetune.model import base_of

    base = base_of(model)
    trained = {p for p in model.parameters() if p.requires_grad}
    trained |= {p for p in model.parameters() if getattr(p, "_stand_in", False)}  # 4-bit experts' shapes: no data
    encoder = base.model.encoder.language_model.layers
    decoder = base.model.decoder.layers
    for enc, dec in zip(encoder, decoder):
        fully_shard([enc, dec], ignored_params=trained)
    fully_shard(model, ignored_params=trained)
