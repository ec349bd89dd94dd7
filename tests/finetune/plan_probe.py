"""Measure what the planner predicts: the peak RSS growth of one training step of a composed run, from just before
its model loads (the way training loads it) to the end of the optimizer step. Prints one JSON line.

    python tests/finetune/plan_probe.py '["model.name_or_path=DIR", "data.max_prompt_tokens=256", ...]'

Run in its own process, so nothing else the test session holds is counted.
"""

import ctypes
import gc
import json
import os
import sys
import time

import torch

from finetune import emulated
from finetune.canvas import collate, fill_response
from finetune.config import compose, settings
from finetune.model import attach_lora, dtype_for, load_model
from finetune.objective import diffusion_loss
from finetune.plan import model_config, plan
from finetune.train import prepare


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    """The peak resident memory since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def warm_up():
    """One small step first: the thread pools, kernel workspaces and library code a step touches the first time are
    the process's, not the run's (about 0.1 GB of RSS on CPU), and are not what the plan predicts."""
    from finetune.tiny import build_config, build_tokenizer
    from transformers import DiffusionGemmaForBlockDiffusion

    tokenizer = build_tokenizer()
    model = DiffusionGemmaForBlockDiffusion(build_config(tokenizer))
    model.set_experts_implementation("eager")
    batch = collate([fill_response([5] * 20, [6] * 10, 8, 1)], 0)
    for self_conditioning in (True, False):
        diffusion_loss(model, batch, settings(compose([]).objective), 8,
                       self_conditioning=torch.tensor([self_conditioning])).loss.backward()


def main(overrides):
    cfg = compose(overrides)
    predicted = plan(cfg)
    warm_up()
    config = model_config(settings(cfg.model))
    c, vocab = config.canvas_length, config.text_config.vocab_size
    batch_size, prompt, response = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_canvases * c
    g = torch.Generator().manual_seed(0)
    batch = collate([fill_response(torch.randint(5, vocab, (prompt,), generator=g).tolist(),
                                   torch.randint(5, vocab, (response - 1,), generator=g).tolist(), c, 1)
                     for _ in range(batch_size)], 0)  # the longest example the settings let through
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:  # the kernel's high-water mark from here: no sampling thread
        f.write("5")
    model = load_model(cfg.model.name_or_path, dtype_for(cfg.model.dtype, "cpu"), "cpu",
                       quantization=cfg.model.quantization, experts=cfg.model.experts_implementation,
                       quant_type=cfg.model.quant_type)
    model = attach_lora(model, settings(cfg.lora)).train()
    prepare(model, settings(cfg.train))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    self_conditioning = torch.full((batch_size,), cfg.objective.self_conditioning_p > 0)
    started = time.perf_counter()
    # as the trainer's step runs it: half products through fp32 on a CPU without native half matmul
    with emulated.fp32_products(emulated.wanted("cpu", {model.get_base_model().dtype})):
        out = diffusion_loss(model.get_base_model(), batch, settings(cfg.objective), c,
                             generator=torch.Generator().manual_seed(1), self_conditioning=self_conditioning)
        out.loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started  # the step alone (bench/rehearsal.py: its rate against its FLOPs)
    print(json.dumps({"measured": hwm() - base, "predicted": predicted.peak, "seconds": seconds,
                      "parts": {name: nbytes for name, nbytes, _ in predicted.parts}}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
