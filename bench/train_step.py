"""One LoRA training step, the lean loss against the stock loss, in one process on the same batches.

    python bench/train_step.py                      # tiny, then vocab: about 4 minutes on one CPU thread
    python bench/train_step.py --case tiny --steps 20
    python bench/train_step.py --case vocab --steps 3 --json vocab.json
    python bench/train_step.py --case slice --layers 2 --experts eager,grouped_mm        # GPU
    python bench/train_step.py --case full --recipes chat_spark --experts grouped_mm     # GPU: 51 GB of weights + the step
    python bench/train_step.py --case slice --layers 1 --keep-experts 8 --recipes chat_spark --half-products native,fp32 \
        --set hardware=cpu --set data.max_prompt_tokens=64 --set data.max_response_canvases=1 --no-stock --steps 1 \
        --warmup 0 --profile 15
                                                    # CPU: one real-width bf16 step, as main ran it and through fp32

A step is `finetune.objective.diffusion_loss` + backward, with LoRA r16 on attention and the dense MLP shared by
encoder and decoder (`finetune.model.attach_lora`, `LoraSettings()`); no optimizer step. Two paths:
- stock: ``diffusion_loss(..., lean=False)``: full-vocabulary fp32 soft-capped logits for every canvas position of
  both decoder passes and every encoder position, then F.cross_entropy (a plain ``model(...).logits`` recipe);
- lean: ``diffusion_loss(..., lean=True)``: logits a chunk at a time, only where a loss reads them.
Every variant of a case runs on the same batches with the same noise (t, canvas, corrupted tokens fixed beforehand)
and self-conditioning forced on (the step that sets the peak). Repetitions rotate the variants' order so none
always runs on warm caches; gc, malloc_trim and torch.cuda.empty_cache run between steps. Printed per variant:
- step time: median of --steps after --warmup repetitions;
- tokens/s: the batch's prompt + response tokens / step time;
- peak memory: CPU: growth of the process's RSS over the step, sampled every ~1 ms from /proc/self/statm by a
  thread, from a baseline read right before the step; CUDA: torch.cuda.max_memory_allocated (reset before the
  step) minus what was allocated before it. "total" adds that baseline (weights and all).

Cases (--case; none: tiny then vocab):
- tiny: `finetune.tiny.build_config` (4 layers, hidden 64, canvas 8), random weights, batch 4, prompt 32 +
  response 23 (3 canvases), the default objective.
- vocab: the real vocabulary (262,144) on the tiny shape (hidden 64, 2 layers, 4 experts), canvas 256, prompt 512 +
  response 1,000 (4 canvases), batch 1; lean and stock with the encoder's next-token loss on (weight 1) and off (0).
  Its last line: ``lean/stock peak memory ratio: X step time ratio: Y`` (encoder loss on).
- slice, full (CUDA only): the shipped 26B-A4B config (finetune/models/diffusiongemma-26b-a4b-it), random bf16
  weights built on the card (no download); slice = its first --layers layers (the last one full-attention), full
  = all 30. Sequence settings from each recipe in --recipes, composed as `python -m finetune recipe=...` would:
  prompt = data.max_prompt_tokens, response = the longest that fits data.max_response_canvases, batch =
  train.batch_size, objective = the recipe's, bf16 autocast = hardware.bf16, checkpointing =
  train.gradient_checkpointing unless --checkpointing/--no-checkpointing says otherwise. A variant that runs out of
  memory is reported as OOM and the others go on.
--experts eager,grouped_mm runs lean once per experts implementation (`set_experts_implementation`); stock always
runs eager, and each lean variant is also given as a ratio to stock eager. --half-products native,fp32 runs lean once
per way of multiplying half-precision tensors on a CPU (finetune.emulated): native = aten's half kernels (the chunked
head too: what main ran before the fp32 path), fp32 = what training does on a CPU without native half matmul (the
head's fp32 tile products, the step inside `fp32_products()`). On a CPU, slice builds the real-width layers in bf16
(minutes; --keep-experts N of the 128 experts to fit memory), --set KEY=VALUE overrides the recipe (sequence
lengths), and --profile N prints each variant's top N ops by self CPU time (torch.profiler, the last measured step).
The step's model FLOPs at this machine's measured fp32 matmul rate are printed beside each CPU step time.

Model FLOPs and MFU (printed for every case, MFU where the card's bf16 dense peak is known; --peak-tflops sets it).
Model FLOPs count the work a step needs, not recomputation (checkpointing, the lean head's backward):
    T   = a pass's tokens: encoder prompt + response (+ EOS), decoder the canvases (batch x canvas_length)
    N   = per token and pass, the weights it multiplies by: attention projections + dense MLP + router
          + top_k/num_experts of the expert weights, summed over layers (+ the self-conditioning MLP in the decoder)
    L   = LoRA weights per token and pass: r * (in + out) per adapted linear
    A   = attention: 4 * heads * head_dim per visible (query, key) pair, pairs counted from the training masks
    a pass with gradient (encoder, decoder): 2*N*T + 2*L*T + A forward; 2*N*T + 4*L*T + 2*A backward, where the
          frozen weights get no weight gradient (activation gradients only: the 6*N*T rule does not apply)
    the self-conditioning pass (no gradient): 2*N*T + 2*L*T + A
    head (tied, frozen), per row: 2*H*V forward (+ 2*H*V backward where a loss reads it): the canvas positions
          scored, the encoder positions of the next-token loss, and each self-conditioning canvas position twice
          (logits, then softmax @ embeddings)
    MFU = model FLOPs / step time / the card's peak (bf16 dense; table PEAK_TFLOPS below).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # this checkout's finetune, and make_26b_config

import torch
import transformers
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from finetune.canvas import collate, decoder_masks, encoder_masks, fill_response
from finetune.config import LoraSettings, ObjectiveConfig
from finetune.model import attach_lora, text_layers
from finetune.objective import diffusion_loss

GB = 1e9
# bf16 dense tensor-core peak, TFLOPS, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GB10", 125.0),  # DGX Spark: NVIDIA states 1 PFLOP FP4 with sparsity only; bf16 dense taken as 1/8 of it
    ("RTX PRO 6000 Blackwell Max-Q", None),  # 300 W variant: lower clocks, no published bf16 figure
    ("RTX PRO 6000 Blackwell", 503.8),  # 600 W workstation / server edition
    ("A100", 312.0),
]


# --- what runs ----------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    lean: bool
    experts: str
    objective: ObjectiveConfig
    compiled: bool = False  # --compile: the text layers through torch.compile (finetune.train.compile_layers)
    products: str = "default"  # --half-products: native (aten's half kernels everywhere) | fp32 (finetune.emulated)
    expert_forward: str = "ours"  # expert LoRA: ours (finetune.expert_lora) | peft (its parametrisation of W + BA)


@dataclass
class Workload:
    """One case's model input: the batch, its fixed noise, and what the numbers are labelled with."""

    label: str
    cpu_batch: dict
    cpu_noise: dict
    tokens: int  # prompt + response tokens in the batch
    canvas_length: int
    device: str
    autocast: torch.dtype | None = None
    checkpointing: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.batch = {k: v.to(self.device) for k, v in self.cpu_batch.items()}
        self.noise = {k: v.to(self.device) for k, v in self.cpu_noise.items()}


def require_lean() -> None:
    if "lean" not in inspect.signature(diffusion_loss).parameters:
        sys.exit("bench/train_step.py: finetune.objective.diffusion_loss has no `lean` argument in this checkout: "
                 "merge main (issue 9's lean loss) first")


def make_batch(prompt_len: int, response_len: int, batch_size: int, canvas_length: int, vocab: int, low: int,
               eos_id: int, pad_id: int, seed: int = 0) -> tuple[dict, int]:
    """Equal-length random examples (no padding), collated as training collates them."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for row in range(batch_size):
        ids = torch.randint(low, vocab, (prompt_len + response_len,), generator=g).tolist()
        examples.append(fill_response(ids[:prompt_len], ids[prompt_len:], canvas_length, eos_id, row=row))
    return collate(examples, pad_id), batch_size * (prompt_len + response_len)


def fixed_noise(batch: dict, canvas_length: int, vocab: int, t_min: float, seed: int = 0) -> dict:
    """t, canvas and corrupted canvas per target, and self-conditioning on for every example: every variant then
    computes the same loss on the same input."""
    g = torch.Generator().manual_seed(seed)
    n = len(batch["target_example"])
    canvas_index = (torch.rand(n, generator=g) * batch["num_canvases"]).long().clamp_max(batch["num_canvases"] - 1)
    t = t_min + (1.0 - t_min) * torch.rand(n, generator=g)
    offsets = torch.arange(canvas_length)[None]
    targets = batch["target_tokens"].gather(1, canvas_index[:, None] * canvas_length + offsets)
    corrupted = torch.rand(targets.shape, generator=g) < t[:, None]
    noisy = torch.where(corrupted, torch.randint(0, vocab, targets.shape, generator=g), targets)
    sc = torch.ones(batch["input_ids"].shape[0], dtype=torch.bool)
    return {"t": t, "canvas_index": canvas_index, "noisy": noisy, "self_conditioning": sc}


# --- measuring ----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory a block adds over what was in use when it started (bytes), and that baseline."""

    def __init__(self, device: str):
        self.device = device
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self.rss())

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self._stop = threading.Event()
            self.baseline = self._peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.baseline
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak, self.rss()) - self.baseline


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # glibc keeps freed heap pages; hand them back so the next step's RSS baseline is honest
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def set_experts(model, name: str) -> None:
    base = model.get_base_model()
    if base.config._experts_implementation != name:
        try:
            base.set_experts_implementation(name)
        except (ValueError, ImportError, RuntimeError) as e:
            sys.exit(f"bench/train_step.py: --experts {name} is not available here: {str(e).splitlines()[0]}")


def set_compiled(model, on: bool) -> None:
    """Compile the layers once (`finetune.train.compile_layers`, inductor), then switch between the compiled and the
    plain call per variant: the same weights run both ways."""
    layers = text_layers(model)
    if on and not hasattr(model, "_bench_compiled"):
        from finetune.train import compile_layers

        compile_layers(model)
        model._bench_compiled = [layer._compiled_call_impl for layer in layers]
    for layer, compiled in zip(layers, getattr(model, "_bench_compiled", [None] * len(layers))):
        layer._compiled_call_impl = compiled if on else None


def products(variant: Variant):
    """The context a variant's step runs in: native = the chunked head's half products in the half dtype and no
    dispatch mode (main before finetune.emulated); fp32 = the fp32 head and `fp32_products()`; default: as is."""
    from contextlib import ExitStack

    import finetune.head as head
    from finetune import emulated

    stack = ExitStack()
    if variant.products == "native":
        saved = head.slow_half
        head.slow_half = lambda device, dtype: False
        stack.callback(setattr, head, "slow_half", saved)
    elif variant.products == "fp32":
        stack.enter_context(emulated.fp32_products())
    return stack


def set_expert_forward(model, which: str) -> None:
    """Expert LoRA through our per-expert forward, or through peft's own (the stock way: W + BA for every expert)."""
    from finetune import expert_lora

    for _, outer in expert_lora.expert_wrappers(model):
        if which == "peft":
            outer.__dict__.pop("forward", None)  # the class's forward: peft's parametrisation
        elif "forward" not in outer.__dict__:
            expert_lora.install(model)


def one_step(model, work: Workload, variant: Variant, device: str, profile: int = 0) -> tuple[float, int, int, float]:
    """(seconds, peak bytes over the baseline, baseline bytes, loss) of one forward + backward."""
    set_experts(model, variant.experts)
    set_expert_forward(model, variant.expert_forward)
    set_compiled(model, variant.compiled)
    for p in model.parameters():
        p.grad = None
    base = model.get_base_model()
    autocast = torch.autocast(device, dtype=work.autocast) if work.autocast else nullcontext()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext()
    with PeakMemory(device) as memory, profiler as prof, products(variant):
        start = time.perf_counter()
        with autocast:
            out = diffusion_loss(base, work.batch, variant.objective, work.canvas_length, lean=variant.lean,
                                 **work.noise)
        out.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    if profile:
        print(f"\n-- {variant.name}: {seconds:.1f} s, top {profile} ops by self CPU time (under the profiler)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile), flush=True)
    loss = float(out.loss.detach())
    del out
    return seconds, memory.peak, memory.baseline, loss


def measure(model, work: Workload, variants: list[Variant], device: str, steps: int, warmup: int,
            profile: int = 0) -> dict:
    """Each variant's step, repeated warmup + steps times in rotating order; OOM ends a variant, not the run."""
    runs = {v.name: {"seconds": [], "peak": [], "baseline": [], "loss": None, "oom": False} for v in variants}
    for rep in range(warmup + steps):
        k = rep % len(variants)
        for variant in variants[k:] + variants[:k]:
            run = runs[variant.name]
            if run["oom"]:
                continue
            release(device)
            try:
                seconds, peak, baseline, loss = one_step(model, work, variant, device,
                                                         profile if rep == warmup + steps - 1 else 0)
            except torch.OutOfMemoryError:
                run["oom"] = True  # released below, once the exception (and the frames it holds) is gone
            if run["oom"]:
                for p in model.parameters():
                    p.grad = None
                release(device)
                continue
            run["loss"] = loss
            if rep >= warmup:
                run["seconds"].append(seconds)
                run["peak"].append(peak)
                run["baseline"].append(baseline)
    release(device)
    return runs


# --- model FLOPs --------------------------------------------------------------------------------------------------
def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _lora_numel(module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n) if module is not None else 0


def _frozen_numel(module) -> int:
    """The frozen weights a module multiplies by, counted from shapes rather than storage, so that 4-bit weights
    (--quantization: bitsandbytes' Linear4bit packs two values a byte; 4-bit experts are buffers, not Parameters)
    count as the values they stand for and the model FLOPs do not depend on how the weights are stored."""
    if module is None:  # v_proj of full-attention layers (attention_k_eq_v)
        return 0
    if hasattr(module, "gate_up_4bit"):  # finetune.quantize.install_experts4bit: its Parameters are gone
        return 3 * module.num_experts * module.intermediate_dim * module.hidden_dim
    linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name}
    total = sum(m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
                for m in linears.values())
    covered = {f"{name}.{p}" if name else p for name, m in linears.items() for p in ("weight", "bias")}
    return total + sum(p.numel() for n, p in module.named_parameters() if n not in covered and "lora_" not in n)


def model_flops(model, work: Workload, objective: ObjectiveConfig) -> dict:
    """The step's model FLOPs, as the module docstring defines them."""
    base = model.get_base_model()
    text = base.config.text_config
    layers = base.model.encoder.language_model.layers
    n_layers = l_lora = 0
    for layer in layers:
        attn = layer.self_attn
        n_layers += sum(_frozen_numel(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        n_layers += _frozen_numel(layer.mlp) + layer.router.proj.weight.numel()
        n_layers += _frozen_numel(layer.experts) * text.top_k_experts // text.num_experts
        # a token runs the LoRA of the top-k experts it is routed to, not of all of them
        experts_lora = _lora_numel(layer.experts)
        l_lora += _lora_numel(layer) - experts_lora + experts_lora * text.top_k_experts // text.num_experts
    n_sc = _numel(base.model.decoder.self_conditioning)
    batch, noise, c = work.cpu_batch, work.cpu_noise, work.canvas_length
    bsz, length = batch["input_ids"].shape
    sliding = text.sliding_window if "sliding_attention" in text.layer_types else None
    heads = [text.num_attention_heads * text.per_layer_config[i].head_dim for i in range(len(layers))]

    def attention(masks: dict, copies: int) -> int:
        pairs = {kind: int(m.sum()) * (copies if m.shape[0] == 1 else 1) for kind, m in masks.items()}
        return sum(4 * h * pairs[text.layer_types[i]] for i, h in enumerate(heads))

    starts = (batch["target_start"] + noise["canvas_index"] * c)[:, None]  # one target per example here
    a_enc = attention(encoder_masks(length, sliding, "cpu"), bsz)
    a_dec = attention(decoder_masks(starts, length, c, sliding), 1)
    t_enc, t_dec = bsz * length, bsz * c

    def forward_only(n, t, a):
        return 2 * n * t + 2 * l_lora * t + a

    def with_grad(n, t, a):  # forward, then activation gradients only for frozen weights, both for LoRA
        return forward_only(n, t, a) + 2 * n * t + 4 * l_lora * t + 2 * a

    hv = 2 * text.hidden_size * text.vocab_size
    head = 2 * hv * t_dec  # canvas CE (every position is scored with loss_on=supervised)
    if objective.loss_on == "corrupted":
        targets = batch["target_tokens"].gather(1, noise["canvas_index"][:, None] * c + torch.arange(c)[None])
        head = 2 * hv * int((noise["noisy"] != targets).sum())
    if objective.encoder_ar_weight > 0:
        head += 2 * hv * int(batch["ar_mask"][:, 1:].sum())
    sc_on = bool(noise["self_conditioning"].any())
    flops = with_grad(n_layers, t_enc, a_enc) + with_grad(n_layers + n_sc, t_dec, a_dec) + head
    if sc_on:
        flops += forward_only(n_layers + n_sc, t_dec, a_dec) + 2 * hv * t_dec
    active = n_layers + text.hidden_size * text.vocab_size
    return {"model_flops": flops, "active_params_per_token": active, "lora_params_per_token": l_lora}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def peak_tflops(override: float | None) -> tuple[str, float | None]:
    """(device name, its bf16 dense peak in TFLOPS or None)."""
    if not torch.cuda.is_available():
        return cpu_name(), override
    name = torch.cuda.get_device_name()
    if override:
        return name, override
    return name, next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# --- cases --------------------------------------------------------------------------------------------------------
TARGETS = ["attn_mlp"]  # --targets: the lora.targets the case's model is built with (main sets it per run)
EXPERT_FORWARDS = ["ours"]  # --expert-forward


def lora_model(config: DiffusionGemmaConfig, device: str, dtype: torch.dtype, seed: int = 0,
               quantization: str = "none"):
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if quantization != "none":  # as model.quantization does it after loading (finetune.quantize)
        from finetune.quantize import quantize_dense, quantize_experts

        if quantization == "all4bit":
            quantize_dense(model)
        quantize_experts(model)
    model = attach_lora(model, LoraSettings(targets=TARGETS[0]))
    model.train()
    return model


def variants_for(objectives: dict[str, ObjectiveConfig], experts: list[str], compiled: bool = False,
                 half_products: list[str] = ("default",), stock: bool = True) -> list[Variant]:
    """Stock (eager experts) and lean (each experts implementation, each --half-products; with --compile, also
    compiled), per objective."""
    out = []
    on_experts = TARGETS[0] in ("attn_mlp_experts", "experts")
    tag = f" [{TARGETS[0]}]" if TARGETS[0] != "attn_mlp" else ""
    for suffix, objective in objectives.items():
        suffix = tag + suffix
        if stock:
            out.append(Variant(f"stock eager{suffix}", False, "eager", objective))
        for h in half_products:
            label = "" if h == "default" else f" {h} products"
            out += [Variant(f"lean {e}{label}{suffix}", True, e, objective, products=h) for e in experts]
            if on_experts and "peft" in EXPERT_FORWARDS:
                out += [Variant(f"lean {e}{label} peft-experts{suffix}", True, e, objective, products=h,
                                expert_forward="peft") for e in experts]
        if compiled:
            out.append(Variant(f"lean {experts[0]} compiled{suffix}", True, experts[0], objective, compiled=True))
    return out


def tiny_case(args, device: str) -> tuple[list, str | None]:
    from finetune.tiny import SPECIALS, build_config, build_tokenizer

    tok = build_tokenizer()
    config = build_config(tok)  # canvas 8
    c = config.canvas_length
    batch, tokens = make_batch(32, 3 * c - 1, 4, c, len(tok), len(SPECIALS), tok.eos_token_id, tok.pad_token_id)
    objective = ObjectiveConfig()
    model = lora_model(config, device, getattr(torch, args.dtype))
    work = Workload(f"tiny: finetune.tiny config (4 layers, hidden 64, {args.dtype}), batch 4, prompt 32 + response 23, "
                    "canvas 8",
                    batch, fixed_noise(batch, c, len(tok), objective.t_min), tokens, c, device,
                    checkpointing=bool(args.checkpointing) and set_checkpointing(model, True))
    return report("tiny", model, work, variants_for({"": objective}, args.experts, args.compile, args.half_products),
                  device, args), None


def vocab_case(args, device: str) -> tuple[list, str | None]:
    from make_26b_config import slice_config

    from finetune.tiny import SPECIALS, build_config, build_tokenizer

    tok = build_tokenizer()
    vocab, c = 262_144, 256
    config = slice_config(build_config(tok, canvas_length=c), 2, vocab_size=vocab)
    batch, tokens = make_batch(512, 1000, 1, c, vocab, len(SPECIALS), tok.eos_token_id, tok.pad_token_id)
    on, off = ObjectiveConfig(encoder_ar_weight=1.0), ObjectiveConfig(encoder_ar_weight=0.0)
    model = lora_model(config, device, torch.float32)
    work = Workload("vocab: vocabulary 262,144, hidden 64, 2 layers, 4 experts, canvas 256, prompt 512 + response "
                    "1,000 (4 canvases), batch 1", batch, fixed_noise(batch, c, vocab, on.t_min), tokens, c, device,
                    checkpointing=bool(args.checkpointing) and set_checkpointing(model, True))
    variants = variants_for({", enc loss on": on, ", enc loss off": off}, args.experts, args.compile)
    rows = report("vocab", model, work, variants, device, args)
    by = {r["variant"]: r for r in rows}
    tag = f" [{TARGETS[0]}]" if TARGETS[0] != "attn_mlp" else ""
    lean_on, lean_off = by[f"lean {args.experts[0]}{tag}, enc loss on"], by[f"lean {args.experts[0]}{tag}, enc loss off"]
    stock_on, stock_off = by[f"stock eager{tag}, enc loss on"], by[f"stock eager{tag}, enc loss off"]
    if not all("seconds" in r for r in (lean_on, lean_off, stock_on, stock_off)):
        return rows, "lean/stock peak memory ratio: n/a step time ratio: n/a (a variant ran out of memory)"
    for name, a, b in (("lean", lean_on, lean_off), ("stock", stock_on, stock_off)):
        print(f"encoder loss on/off, {name}: peak memory {a['peak_gb'] / b['peak_gb']:.2f}x, "
              f"step time {a['seconds'] / b['seconds']:.2f}x" + ("  (target: <= 1.3 both)" if name == "lean" else ""))
    print("targets, encoder loss on: lean/stock peak memory <= 0.40, step time <= 1.00")
    final = (f"lean/stock peak memory ratio: {lean_on['peak_gb'] / stock_on['peak_gb']:.2f} "
             f"step time ratio: {lean_on['seconds'] / stock_on['seconds']:.2f}")
    return rows, final


def real_case(args, device: str, case: str) -> tuple[list, str | None]:
    from make_26b_config import OUT, slice_config

    from finetune.config import compose
    from finetune.objective import objective_settings

    config = DiffusionGemmaConfig.from_pretrained(OUT)
    if case == "slice":
        config = slice_config(config, args.layers, **({"num_experts": args.keep_experts} if args.keep_experts else {}))
    text = config.text_config
    c, vocab = config.canvas_length, text.vocab_size
    model = lora_model(config, device, torch.bfloat16, quantization=args.quantization)
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}
                  .values())
    rows = []
    for recipe in args.recipes:
        cfg = compose([f"recipe={recipe}", *args.set])
        objective = objective_settings(cfg.objective)
        canvases, bsz = cfg.data.max_response_canvases, cfg.train.batch_size
        prompt, response = cfg.data.max_prompt_tokens, canvases * c - 1  # the longest response: + EOS fills them
        batch, tokens = make_batch(prompt, response, bsz, c, vocab, 3, text.eos_token_id, text.pad_token_id)
        want = cfg.train.gradient_checkpointing if args.checkpointing is None else args.checkpointing
        checkpointing = set_checkpointing(model, want)
        layers = f"first {text.num_hidden_layers} layers" if case == "slice" else "all 30 layers"
        work = Workload(
            f"{case} @ {recipe}: 26B-A4B {layers}, random bf16, prompt {prompt} + response {response} ({canvases} "
            f"canvases), batch {bsz}, encoder loss weight {objective.encoder_ar_weight}, checkpointing "
            f"{'on' if checkpointing else 'off'}",
            batch, fixed_noise(batch, c, vocab, objective.t_min), tokens, c, device,
            autocast=torch.bfloat16 if cfg.hardware.bf16 else None, checkpointing=checkpointing,
            extra={"recipe": recipe, "weights_gb": weights / GB, "layers": text.num_hidden_layers})
        variants = variants_for({"": objective}, args.experts, args.compile, args.half_products, args.stock)
        got = report(case, model, work, variants, device, args)
        if device == "cuda":
            compare_with_plan(config, recipe, checkpointing, got, args.quantization)
        rows += got
    return rows, None


def compare_with_plan(config, recipe: str, checkpointing: bool, rows: list, quantization: str = "none") -> None:
    """The planner's prediction (python -m finetune.plan) for this model and recipe beside the measured total (issue
    10: within 15%). The bench takes no optimizer step, so AdamW's two moments (8 bytes per LoRA parameter) are left
    out of the prediction."""
    import tempfile

    from finetune.config import compose
    from finetune.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        # model.revision=null: the schema's default revision ("main") pins a hub id and is refused for a local dir
        cfg = compose([f"recipe={recipe}", f"model.name_or_path={tmp}", "model.revision=null", "model.dtype=bfloat16",
                       f"train.gradient_checkpointing={str(checkpointing).lower()}",
                       f"model.quantization={quantization}"])
        predicted = plan(cfg)
    lora = next(b for name, b, _ in predicted.parts if name.startswith("LoRA"))
    expected = predicted.peak - lora // 2  # 16 bytes per parameter in the plan; 8 without the optimizer
    for row in rows:
        if row["variant"].startswith("lean") and "total_gb" in row:
            row["plan_gb"] = expected / GB
            print(f"plan vs measured, {row['variant']}: predicted {expected / GB:.2f} GB, measured total "
                  f"{row['total_gb']:.2f} GB, ratio {expected / GB / row['total_gb']:.2f} (target 0.85-1.15)")


def set_checkpointing(model, on: bool) -> bool:
    """finetune.checkpointing.enable/disable (encoder and decoder layers) when it changes; returns ``on``."""
    if on == getattr(model, "_bench_checkpointing", False):
        return on
    if importlib.util.find_spec("finetune.checkpointing") is None:
        sys.exit("bench/train_step.py: checkpointing asked for (the recipe's train.gradient_checkpointing or "
                 "--checkpointing) but finetune.checkpointing is not in this checkout: merge main (issue 9) or "
                 "pass --no-checkpointing")
    from finetune import checkpointing

    (checkpointing.enable if on else checkpointing.disable)(model)
    model._bench_checkpointing = on
    return on


# --- reporting ----------------------------------------------------------------------------------------------------
def report(case: str, model, work: Workload, variants: list[Variant], device: str, args) -> list[dict]:
    card, peak = peak_tflops(args.peak_tflops)
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    print(f"\n== {work.label}  [{card}{threads}; median of {args.steps} after {args.warmup} warm-up]", flush=True)
    runs = measure(model, work, variants, device, args.steps, args.warmup, args.profile)
    rows = []
    for v in variants:
        run = runs[v.name]
        flops = model_flops(model, work, v.objective)
        row = {"case": case, "variant": v.name, "lean": v.lean, "experts": v.experts,
               "encoder_ar_weight": v.objective.encoder_ar_weight, "checkpointing": work.checkpointing,
               "tokens": work.tokens, "oom": run["oom"], "loss": run["loss"], **flops, **work.extra}
        if not run["oom"] and run["seconds"]:
            seconds = statistics.median(run["seconds"])
            row.update(seconds=seconds, seconds_all=run["seconds"], tokens_per_s=work.tokens / seconds,
                       peak_gb=max(run["peak"]) / GB, total_gb=max(p + b for p, b in zip(run["peak"], run["baseline"])) / GB,
                       tflops=flops["model_flops"] / seconds / 1e12)
            row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
    stock = next((r for r in rows if not r["lean"] and r["experts"] == "eager" and "seconds" in r), None)
    print(f"{'variant':32} {'step s':>8} {'tokens/s':>9} {'peak GB':>8} {'total GB':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'loss':>9}  vs stock eager (mem, time)")
    for r in rows:
        if "seconds" not in r:
            print(f"{r['variant']:32} {'OOM' if r['oom'] else 'no steps':>8}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "   n/a"
        ratio = ""
        if stock is not None and r is not stock and r["encoder_ar_weight"] == stock["encoder_ar_weight"]:
            ratio = f"  {r['peak_gb'] / stock['peak_gb']:.2f}x, {r['seconds'] / stock['seconds']:.2f}x"
        print(f"{r['variant']:32} {r['seconds']:8.3f} {r['tokens_per_s']:9.0f} {r['peak_gb']:8.3f} {r['total_gb']:9.2f} "
              f"{r['tflops']:8.3f} {mfu:>6} {r['loss']:9.4f}{ratio}")
    if device == "cpu":
        rate = fp32_matmul_rate()
        print(f"fp32 matmul rate here: {rate / 1e9:.1f} GFLOP/s; step time / (model FLOPs at that rate):")
        for r in rows:
            if "seconds" in r:
                r["fp32_rate_gflops"] = rate / 1e9
                r["flop_rate_ratio"] = r["seconds"] / (r["model_flops"] / rate)
                print(f"  {r['variant']:32} {r['flop_rate_ratio']:8.1f}x")
    per_objective = {f"encoder loss weight {r['encoder_ar_weight']:g}": r["model_flops"] for r in rows}
    flops = ", ".join(f"{v / 1e9:,.1f} GFLOP ({k})" for k, v in per_objective.items())
    print(f"model FLOPs per step: {flops}; active parameters per token "
          f"{rows[0]['active_params_per_token'] / 1e6:,.1f}M (text stack + head)"
          f"{'' if peak else '; MFU n/a: no bf16 peak known for this device (--peak-tflops sets it)'}", flush=True)
    return rows


def fp32_matmul_rate(seconds: float = 1.0) -> float:
    """FLOP/s of an fp32 F.linear at real width (256 rows x 2816 x 2816) on this CPU, best of ~``seconds``."""
    import torch.nn.functional as F

    a, w = torch.randn(256, 2816), torch.randn(2816, 2816)
    F.linear(a, w)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        F.linear(a, w)
        best = min(best, time.perf_counter() - start)
    return 2 * 256 * 2816 * 2816 / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--case", choices=("tiny", "vocab", "slice", "full"), help="default: tiny, then vocab")
    parser.add_argument("--steps", type=int, help="measured steps per variant (median); default 10 tiny, 3 others")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured repetitions first")
    parser.add_argument("--experts", default="eager", help="comma list of experts implementations for lean")
    parser.add_argument("--layers", type=int, default=2, help="--case slice: how many of the 30 layers")
    parser.add_argument("--quantization", default="none", choices=("none", "experts4bit", "all4bit"),
                        help="--case slice|full: 4-bit frozen weights (finetune/quantize.py), planned the same way")
    parser.add_argument("--recipes", default="chat_spark,chat_rtx", help="--case slice|full: sequence settings from")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="finetune.checkpointing on/off; default: the recipe's train.gradient_checkpointing "
                             "(slice, full), off (tiny, vocab)")
    parser.add_argument("--compile", action="store_true",
                        help="also run lean with the text layers compiled (train.compile); the compile is not timed")
    parser.add_argument("--half-products", default="default",
                        help="comma list of native,fp32: lean once per way of multiplying half tensors on a CPU")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="--case tiny: the weights' dtype")
    parser.add_argument("--keep-experts", type=int, help="--case slice: keep N of the 128 experts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--case slice|full: a Hydra override of the recipe (repeatable)")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                        help="--case slice|full: also run the stock full-logits step")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print each variant's top N ops by self CPU time (its last measured step)")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak, for MFU")
    parser.add_argument("--targets", default="attn_mlp",
                        help="comma list of lora.targets, each case run once per value (attn_mlp, attn_mlp_experts, "
                             "experts: finetune/expert_lora.py)")
    parser.add_argument("--expert-forward", default="ours",
                        help="comma list of ours,peft: with expert targets, lean also through peft's own forward")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    EXPERT_FORWARDS[:] = [e.strip() for e in args.expert_forward.split(",") if e.strip()]
    args.experts = [e.strip() for e in args.experts.split(",") if e.strip()]
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.half_products = [h.strip() for h in args.half_products.split(",") if h.strip()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case == "full" and device != "cuda":
        sys.exit("bench/train_step.py: --case full builds the real 26B architecture in bf16 and needs a CUDA device; "
                 "on CPU run --case slice --layers 1 --keep-experts 8, --case tiny or --case vocab")
    require_lean()
    cases = [args.case] if args.case else ["tiny", "vocab"]
    steps_given = args.steps
    rows, final = [], None
    for case in cases:
        args.steps = steps_given or (10 if case == "tiny" else 3)
        for targets in [t.strip() for t in args.targets.split(",") if t.strip()]:
            TARGETS[:] = [targets]
            if case == "tiny":
                case_rows, case_final = tiny_case(args, device)
            elif case == "vocab":
                case_rows, case_final = vocab_case(args, device)
            else:
                case_rows, case_final = real_case(args, device, case)
            rows += [{**r, "targets": targets} for r in case_rows]
            final = case_final or final
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(["python bench/train_step.py", *(sys.argv[1:] if argv is None else argv)]),
                "device": peak_tflops(args.peak_tflops)[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "cuda": torch.version.cuda,
                "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if final:
        print(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
