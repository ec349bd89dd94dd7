"""Which experts implementation is fastest for LoRA training: one MoE block, frozen experts, forward + backward.

    python bench/experts.py [--tokens 1024] [--repeats 5] [--sizes tiny,mid,real]

For each size, routes the same tokens through `DiffusionGemmaTextExperts` with every implementation transformers
registers for it (eager, grouped_mm, batched_mm), backpropagates to the tokens' hidden states (what LoRA training
needs: the experts themselves are frozen), and prints the median time, the ratio to eager and the largest output and
gradient difference to eager, and after the real size, the `model.experts_implementation` to set on this device
(`auto` picks from these numbers per device: `finetune.model.experts_for`; on sm_12x cards grouped_mm may run a
slower per-expert fallback, which this measures). Sizes: tiny = the built-in tiny model; mid = hidden 512, 32 experts of 256, top 8;
real = the 26B model's expert shape (hidden 2816, 128 experts of 704, top 8: one layer, about 1.1 GB in fp32).
batched_mm copies each token's expert weights (hundreds of MB per token at real size): it is skipped there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from finetune.tiny import build_config, build_tokenizer

SIZES = {  # hidden, experts, top-k, expert intermediate
    "tiny": (64, 4, 2, 32),
    "mid": (512, 32, 8, 256),
    "real": (2816, 128, 8, 704),
}
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def moe_layer(hidden, experts, top_k, intermediate, device, dtype):
    config = build_config(build_tokenizer())
    text = config.text_config
    text.hidden_size, text.intermediate_size = hidden, 2 * hidden
    text.num_experts, text.top_k_experts, text.moe_intermediate_size = experts, top_k, intermediate
    text.head_dim, text.global_head_dim = hidden // 4, hidden // 2
    text.num_hidden_layers, text.layer_types = 1, text.layer_types[:1]
    torch.manual_seed(0)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion(config).to(dtype).requires_grad_(False)
    return model, model.model.decoder.layers[0]


def step(layer, x):
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    _, weights, index = layer.router(x)
    out = layer.experts(x, index, weights)
    out.float().square().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.detach(), x.grad.clone()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", default="tiny,mid,real")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, {dtype}, {args.tokens} tokens, median of {args.repeats}")
    for size in args.sizes.split(","):
        model, layer = moe_layer(*SIZES[size], args.device, dtype)
        x = torch.randn(args.tokens, SIZES[size][0], device=args.device, dtype=dtype, requires_grad=True)
        times, reference = {}, None
        for name in IMPLEMENTATIONS:
            if name == "batched_mm" and size == "real":
                continue
            model.set_experts_implementation(name)
            runs = [step(layer, x) for _ in range(args.repeats + 1)][1:]  # the first run warms up
            times[name] = statistics.median(r[0] for r in runs)
            out, grad = runs[-1][1:]
            reference = reference or (out, grad)
            diff = max(float((out - reference[0]).abs().max()), float((grad - reference[1]).abs().max()))
            print(f"{size:5} {name:11} {times[name] * 1000:9.1f} ms  x{times[name] / times['eager']:.2f} of eager  "
                  f"max diff to eager {diff:.1e}")
        del model, layer, x
        if size == "real":  # the 26B model's own shape decides the setting
            print(recommendation(times, args.device))


def recommendation(times: dict, device: str) -> str:
    """The setting these numbers call for on this device, against what model.experts_implementation=auto picks."""
    from finetune.model import experts_for

    fastest = min(times, key=times.get)
    auto = experts_for("auto", "cuda" if device.startswith("cuda") else device)
    if fastest == auto or times[auto] <= 1.05 * times[fastest]:
        return f"use model.experts_implementation=auto (it picks {auto}: within 5% of the fastest here)"
    return (f"use model.experts_implementation={fastest}: x{times[auto] / times[fastest]:.2f} faster than {auto}, "
            f"which auto picks on this device")


if __name__ == "__main__":
    main()
