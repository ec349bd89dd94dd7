"""Held-out denoising loss at fixed noise levels, with fixed noise, so numbers compare run to run."""

from __future__ import annotations

import torch

from finetune.canvas import collate
from finetune.model import base_of
from finetune.objective import ObjectiveConfig, diffusion_loss


@torch.no_grad()
def heldout_loss(model, examples, objective: ObjectiveConfig, canvas_length: int, pad_id: int,
                 t_values=(0.1, 0.3, 0.5, 0.7, 0.9), batch_size: int = 16, batches: int = 4, seed: int = 0):
    """Diffusion loss per t on the first ``batches * batch_size`` examples: a mean over their counted tokens, as the
    trained loss is (not a mean of the chunks' means), so how the examples are chunked changes nothing.

    Every call with the same seed draws the same canvases, the same corruption and no self-conditioning (the
    first-step setting), so base and adapter are scored on identical inputs.
    """
    base = base_of(model)
    device = next(base.parameters()).device
    settings = ObjectiveConfig(**{**objective.__dict__, "self_conditioning_p": 0.0, "encoder_ar_weight": 0.0})
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)][:batches]
    result = {}
    for t in t_values:
        generator = torch.Generator().manual_seed(seed)
        total, tokens = 0.0, 0.0
        for chunk in chunks:
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            out = diffusion_loss(
                base, batch, settings, canvas_length, generator=generator,
                t=torch.full((len(batch["target_example"]),), float(t)),  # per target: data.supervise=all has several
                self_conditioning=torch.zeros(len(chunk), dtype=torch.bool),
            )
            total += float(out.diffusion_sum)
            tokens += float(out.counts[0])
        result[float(t)] = total / max(tokens, 1.0)
    return result
