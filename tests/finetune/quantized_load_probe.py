"""Measure one load of a saved DiffusionGemma with 4-bit experts in a process of its own; print one JSON line.

    python tests/finetune/quantized_load_probe.py DIR streamed|then_quantize [--compare]

streamed: `finetune.model.load_model` with model.quantization (experts quantised as the checkpoint streams in);
then_quantize: `finetune.model.load_model` then `finetune.quantize.quantize_experts`, the route that holds the bf16
model first.
peak: the kernel's high-water mark of resident memory (VmHWM, reset just before the load: no sampling to miss a
spike) less the resident memory before it; quantize_one: the same for quantising one bf16 tensor of the largest
expert shape (the quantiser's working memory); held: the bytes of every tensor the loaded model keeps (parameters,
buffers, 4-bit storage, each once). With --compare, after measuring, the other route loads the same checkpoint and
``max_abs_diff`` is how far its logits are from these on one fixed input.
"""

import ctypes
import gc
import json
import sys

import torch


def status() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def load(path: str, how: str):
    from finetune.model import load_model
    from finetune.quantize import quantize_experts

    if how == "streamed":
        return load_model(path, torch.bfloat16, "cpu", "experts4bit", experts="eager")
    model = load_model(path, torch.bfloat16, "cpu", experts="eager")
    quantize_experts(model)
    return model


def held_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def logits(model):
    config = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.text_config.vocab_size, (2, 24), generator=g)
    canvas = torch.randint(5, config.text_config.vocab_size, (2, config.canvas_length), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits.float()


def quantize_one(text) -> int:
    """Peak growth of quantising one bf16 tensor of the largest expert shape (the quantiser's own working memory)."""
    from finetune.quantize import quantize_expert_weight

    weight = torch.randn(text.num_experts, 2 * text.moe_intermediate_size, text.hidden_size).to(torch.bfloat16)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    storage = quantize_expert_weight(weight)
    grown = status()["VmHWM"] - before["VmRSS"]
    del storage
    return grown


def warm_up(how: str):
    """One load of the tiny model first: the code, kernels and pools a load touches the first time are not its cost."""
    import shutil
    import tempfile

    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.tiny import build_config, build_tokenizer

    tmp = tempfile.mkdtemp()
    try:
        DiffusionGemmaForBlockDiffusion(build_config(build_tokenizer())).save_pretrained(tmp)
        load(tmp, how)
    finally:
        shutil.rmtree(tmp)


def main(path: str, how: str, *flags: str):
    warm_up(how)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    model = load(path, how)
    end = status()
    out = {"peak": end["VmHWM"] - base["VmRSS"], "end": end["VmRSS"] - base["VmRSS"], "held": held_bytes(model),
           "file_pages_end": end["RssFile"] - base["RssFile"]}
    out["quantize_one"] = quantize_one(model.config.text_config)
    if "--compare" in flags:
        mine = logits(model)
        del model
        other = load(path, "then_quantize" if how == "streamed" else "streamed")
        out["max_abs_diff"] = (logits(other) - mine).abs().max().item()
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
