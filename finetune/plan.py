"""Know before you load: the peak memory a training run will need, predicted from its config alone.

    python -m finetune.plan recipe=chat_spark [hardware=dgx_spark] [any override]

The plan is a model of what the code does, and most of it is the code itself, run on PyTorch's ``meta`` device
(shapes and dtypes, no memory, no weights, about a second for the 26B config):
- weights: the real model class built on meta from the run's config (the shipped 26B config for the hub id),
  counted by dtype and part (dense text layers, experts, embeddings/head, vision tower); 4-bit where
  model.quantization quantises (experts4bit: the experts, as finetune.quantize stores them; all4bit: the dense text
  linears too), each tied tensor once;
- LoRA: `finetune.model.attach_lora` on that meta model: fp32 weights, gradients and AdamW's two moments;
- activations: one training step's encoder and decoder passes (`finetune.objective.encode` / `decode`) on meta
  inputs of the run's largest shapes (batch x (prompt + response) for the encoder, batch x one canvas for the
  decoder), every tensor autograd saves for backward counted once (by storage), layer by layer. Attention is
  planned as the fused kernels keep it (query, key, value, output, log-sum-exp and the boolean mask as a float
  bias), not as meta's fallback keeps it (the full probability matrix). With train.gradient_checkpointing each
  layer keeps only its input, plus one layer's activations while it is recomputed; the KV cache stays either way;
- the head (`finetune.head`): one chunk of logits at a time (a 256-row band of the vocabulary on a GPU);
- backward's working set: with train.gradient_checkpointing one layer recomputed and differentiated; without, none
  (backward frees each layer's saved tensors as it makes that layer's gradients, so the peak is what forward kept:
  BACKWARD_FACTOR, measured); and, for the verdict only, the CUDA context.
`tests/finetune/test_plan.py` checks the prediction against measured peak RSS growth on CPU.
"""

from __future__ import annotations

import os
import sys
import warnings
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune import distributed
from finetune.config import ModelSettings, settings
from finetune.errors import UserError

GB = 1e9
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "diffusiongemma-26b-a4b-it")
SHIPPED = {"google/diffusiongemma-26B-A4B-it": SHIPPED_DIR}  # hub ids whose config ships with the toolkit
CUDA_CONTEXT = int(0.8 * GB)  # the driver's context and cuBLAS workspaces: outside PyTorch's allocator
# How far a plan may be off, from its checks against measurement: on an H200 the 26B slices and full model were
# planned at 1.00-1.10 of the measured peak (bench/RESULTS.md, GPU section), on CPU mid-size configs within 6%
# (tests/finetune/test_plan.py). A plan over the memory by less than this is said, not refused.
PLAN_ERROR = 0.10
BACKWARD_FACTOR = 0.0  # backward frees a layer's saved tensors as it makes its gradients: no peak above forward
RECOMPUTE_FACTOR = 1.0  # with checkpointing: one layer recomputed at a time


def model_config(model: ModelSettings):
    """The config of the run's base model, read without downloading or loading a weight."""
    from transformers import DiffusionGemmaConfig

    name = model.name_or_path
    if name == "tiny":
        from finetune.tiny import build_config, build_tokenizer

        return build_config(build_tokenizer(), model.tiny.size, model.tiny.canvas_length)
    shipped = name in SHIPPED  # a local copy of the released config.json: model.revision does not apply to it
    path = SHIPPED.get(name, os.path.expanduser(name))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"model.name_or_path={name}: no config.json in {path}, so the plan cannot read the model")
        from finetune.model import check_architecture

        # another architecture's config would not even build; a local directory with a model.revision is refused
        check_architecture(path, None if shipped else model.revision, model.trust_remote_code)
        return DiffusionGemmaConfig.from_pretrained(path)
    try:  # offline, the cache's refs/ say which commit a branch or tag names
        return DiffusionGemmaConfig.from_pretrained(name, local_files_only=True, revision=model.revision)
    except OSError:
        at = f" --revision {model.revision}" if model.revision else ""
        raise UserError(f"model.name_or_path={name}: its config is not on this machine; download it once "
                        f"(hf download {name} config.json{at}) or give a local directory") from None


# --- activations on the meta device -------------------------------------------------------------------------------
class _PlannedAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention on meta: keeps what the fused CPU and CUDA kernels keep."""

    @staticmethod
    def forward(ctx, query, key, value, bias):
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, *([] if bias is None else [bias]))
        return out

    @staticmethod
    def backward(ctx, grad):  # never runs: the plan only counts what forward saves
        raise NotImplementedError


class _PlannedExperts(torch.autograd.Function):
    """Stands in for grouped_mm on meta (its meta kernel takes bf16 only): keeps the tokens' input and the weight, as
    the experts' matmuls do in every implementation. The frozen expert weights are weights, not activations (`_Saved`
    skips them); what it counts of a weight is a copy made for the pass: expert LoRA's factors cast to the compute
    dtype (finetune.expert_lora.factors)."""

    @staticmethod
    def forward(ctx, tokens, weight):
        ctx.save_for_backward(tokens, weight)
        return tokens.new_empty((tokens.shape[0], weight.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class _PlannedRecomputedExperts(torch.autograd.Function):
    """4-bit experts (finetune.quantize): the block keeps only its inputs (and the LoRA factors of expert LoRA, as
    cast for the pass); backward dequantizes and recomputes it."""

    @staticmethod
    def forward(ctx, hidden, index, weights, *lora):
        ctx.save_for_backward(hidden, index, weights, *lora)
        return torch.empty_like(hidden)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


def _recomputed_experts(self, hidden_states, top_k_index, top_k_weights):
    return _PlannedRecomputedExperts.apply(hidden_states, top_k_index, top_k_weights)


def _recomputed_experts_with_lora(experts, lora, hidden_states, top_k_index, top_k_weights):
    factors = [t for pairs in lora.values() for a, b, _ in pairs for t in (a, b)]
    return _PlannedRecomputedExperts.apply(hidden_states, top_k_index, top_k_weights, *factors)


def _without_expert_lora(experts, lora, hidden_states, top_k_index, top_k_weights):
    return experts(hidden_states, top_k_index, top_k_weights)


def _grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    return _PlannedExperts.apply(mat_a, mat_b)


def _attention(query, key, value, attn_mask=None, **kwargs):
    bias = None
    if attn_mask is not None:
        # the kernels take the boolean mask as a float bias of its own shape (the encoder's is one for the batch)
        bias = attn_mask.to(query.dtype) if attn_mask.dtype == torch.bool else attn_mask
    return _PlannedAttention.apply(query, key, value, bias)


class _Saved:
    """Bytes autograd keeps for backward, by storage (a view of a kept tensor costs nothing more), per layer."""

    def __init__(self, model):
        self.weights = {p.untyped_storage()._cdata for p in model.parameters()}
        self.weights |= {b.untyped_storage()._cdata for b in model.buffers()}
        self.seen: dict[int, tuple[str, int]] = {}
        self.where = "other"

    def pack(self, tensor):
        key = tensor.untyped_storage()._cdata
        if key not in self.weights and key not in self.seen:
            self.seen[key] = (self.where, tensor.untyped_storage().nbytes())
        return tensor

    def by_place(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for where, nbytes in self.seen.values():
            out[where] = out.get(where, 0) + nbytes
        return out


@contextmanager
def _tracking(saved: _Saved, layers: dict[str, list], quantized_experts: bool = False, expert_lora: bool = True):
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    from finetune import expert_lora as lora_module

    experts = contextlib.ExitStack()
    if quantized_experts:
        experts.enter_context(mock.patch.object(DiffusionGemmaTextExperts, "forward", _recomputed_experts))
        experts.enter_context(mock.patch.object(lora_module, "experts_forward", _recomputed_experts_with_lora))
    if not expert_lora:  # the same step as if the experts had no LoRA: what expert LoRA's activations cost
        experts.enter_context(mock.patch.object(lora_module, "experts_forward", _without_expert_lora))
    handles = []
    for name, group in layers.items():
        for i, layer in enumerate(group):
            handles.append(layer.register_forward_pre_hook(
                lambda *_, where=f"{name}.{i}": setattr(saved, "where", where)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _attention), \
                mock.patch.object(torch.nn.functional, "grouped_mm", _grouped_mm, create=True), experts:
            yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Shapes:
    """The largest step the run's settings allow."""

    batch: int
    prompt: int
    response: int  # tokens the encoder reads after the prompt: whole canvases
    canvas: int
    turns: int = 1  # canvases per example in the decoder pass: one per supervised turn (data.supervise=all: K)

    @property
    def encoder_tokens(self) -> int:
        return self.batch * (self.prompt + self.response)

    @property
    def decoder_tokens(self) -> int:
        return self.batch * self.turns * self.canvas


def shapes_of(cfg: DictConfig, canvas: int, turns: int = 1) -> Shapes:
    return Shapes(cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_canvases * canvas, canvas,
                  turns if cfg.data.supervise == "all" else 1)


_MODELS: dict = {}


def _meta_model(config, dtype, lora, attn: str = "sdpa"):
    """The run's model with its LoRA, on meta (kept: a plan's variants differ in shapes, not in the model)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.model import attach_lora

    key = (config.to_json_string(), dtype, repr(lora), attn)
    if key in _MODELS:
        return _MODELS[key]
    _MODELS.clear()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        model = DiffusionGemmaForBlockDiffusion._from_config(config, dtype=dtype, attn_implementation=attn,
                                                             experts_implementation="grouped_mm")
        _MODELS[key] = attach_lora(model, lora).train()
    return _MODELS[key]


def _weight_parts(model, quantization: str) -> dict[str, int]:
    """Bytes of the frozen weights by part, each tied tensor once, as finetune.quantize stores what it quantises."""
    from finetune.quantize import DENSE_BYTES_PER_PARAM, DENSE_LINEARS, EXPERT_BYTES_PER_PARAM

    parts = {"dense": 0, "experts": 0, "embeddings/head": 0, "vision tower": 0}
    base = model.get_base_model()
    dense4 = set()
    if quantization == "all4bit":  # the linears finetune.quantize.quantize_dense quantises, by the same pattern
        dense4 = {id(m.base_layer.weight if hasattr(m, "base_layer") else m.weight)
                  for n, m in base.named_modules() if DENSE_LINEARS.search(n)}
    for name, p in base.named_parameters(remove_duplicate=True):
        if "lora_" in name:
            continue
        part = ("vision tower" if "vision" in name else "experts" if ".experts." in name
                else "embeddings/head" if "embed_tokens" in name or "lm_head" in name else "dense")
        per = (EXPERT_BYTES_PER_PARAM if part == "experts" and quantization != "none"
               else DENSE_BYTES_PER_PARAM if id(p) in dense4 else p.element_size())
        parts[part] += int(p.numel() * per)
    return parts


def _stored_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32").replace("torch.", ""))


def _tensor_in_flight(model, stored: torch.dtype) -> int:
    """Bytes (as stored) of the largest weight: finetune.model.load_model reads each tensor whole into memory of its
    own (safetensors' pread) before transformers converts or copies it into place (the 26B's embedding table, 1.48
    GB in bf16). Measured at real width (bench/RESULTS.md): bf16 5.56 GB through memory maps, 6.20 GB streamed."""
    base = model.get_base_model()
    return max((p.numel() for n, p in base.named_parameters() if "lora_" not in n), default=0) * stored.itemsize


def _largest_layer_weights(model) -> int:
    """Bytes of the largest text layer's weights (an encoder layer and its decoder twin share them)."""
    from finetune.model import text_layers

    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in text_layers(model))


def _activations(model, shapes: Shapes, quantized_experts: bool = False, expert_lora: bool = True) -> dict[str, int]:
    """Saved bytes per layer of the encoder pass and the decoder pass with gradient, from the meta run.

    Layers of one kind (sliding or full attention) keep the same tensors, so the passes run through the first
    layer of each kind only and every layer is given its kind's figure."""
    from finetune.objective import decode, encode

    base = model.get_base_model()
    text = base.config.text_config
    kinds = text.layer_types
    measured = max(kinds.index(kind) for kind in set(kinds)) + 1  # enough layers to meet each kind once
    layers = {"encoder": list(base.model.encoder.language_model.layers), "decoder": list(base.model.decoder.layers)}
    saved = _Saved(model)
    ids = torch.zeros(shapes.batch, shapes.prompt + shapes.response, dtype=torch.long, device="meta")
    canvas = torch.zeros(shapes.batch, shapes.turns * shapes.canvas, dtype=torch.long, device="meta")
    starts = torch.full((shapes.batch, shapes.turns), shapes.prompt, dtype=torch.long, device="meta")
    encoder_trains = any(p.requires_grad for p in base.model.encoder.parameters())
    depth = text.num_hidden_layers
    text.num_hidden_layers = measured  # both passes loop over layers[:num_hidden_layers]
    try:
        with _tracking(saved, layers, quantized_experts, expert_lora):
            with torch.set_grad_enabled(encoder_trains):
                _, cache = encode(base, ids)
            saved.where = "decoder input"
            decode(base, canvas, cache, starts)
    finally:
        text.num_hidden_layers = depth
    cache_kind = {}  # per kind: the cache's keys and values the passes did not already keep (full layers: K = V)
    for i, layer in enumerate(cache.layers[:measured]):
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes()
                    for t in (layer.keys, layer.values) if t is not None}
        cache_kind.setdefault(kinds[i], sum(n for key, n in storages.items() if key not in saved.seen))
    by = saved.by_place()
    first = {kind: kinds.index(kind) for kind in set(kinds)}
    out = {k: v for k, v in by.items() if not k.startswith(("encoder.", "decoder."))}
    for side in ("encoder", "decoder"):
        for i, kind in enumerate(kinds):
            out[f"{side}.{i}"] = by.get(f"{side}.{first[kind]}", 0)
    out["kv cache"] = sum(cache_kind[kind] for kind in kinds)
    return out


def _kept(by: dict, shapes: Shapes, row_bytes: int, checkpointing: bool) -> tuple[int, int, int, int, int]:
    """What the step keeps of the per-layer saved bytes ``by`` (`_activations`): (encoder, decoder, the rest, the KV
    cache, backward's working set). Backward frees a layer's saved tensors as it makes that layer's gradients, so
    without checkpointing the peak is what forward kept; with it each layer keeps its input and one layer at a time
    is recomputed. In largest layers' saved bytes, measured on CPU (tests/finetune/test_plan.py; six mid-size configs
    came within 6%)."""
    encoder = [v for k, v in by.items() if k.startswith("encoder.")]
    decoder = [v for k, v in by.items() if k.startswith("decoder.")]
    other = sum(v for k, v in by.items() if not k.startswith(("encoder.", "decoder.")) and k != "kv cache")
    largest_layer = max([*encoder, *decoder], default=0)
    if checkpointing:
        kept_enc = len(encoder) * shapes.encoder_tokens * row_bytes
        kept_dec = len(decoder) * shapes.decoder_tokens * row_bytes
    else:
        kept_enc, kept_dec = sum(encoder), sum(decoder)
    working = int(largest_layer * (RECOMPUTE_FACTOR if checkpointing else BACKWARD_FACTOR))
    return kept_enc, kept_dec, other, by["kv cache"], working


def _head_bytes(config, shapes: Shapes, dtype, device: str, encoder_loss: bool) -> tuple[int, int]:
    """(kept: the hidden rows the losses save, working: one chunk's logits and their gradient)."""
    from finetune.head import geometry

    text = config.text_config
    rows, cols = geometry(text.vocab_size, torch.device(device))
    size = dtype.itemsize
    scored = shapes.decoder_tokens + (shapes.encoder_tokens if encoder_loss else 0)
    kept = scored * text.hidden_size * size + scored * 4 * 3  # hidden rows, targets, lse, target logits
    working = rows * cols * (size + 4 + 4 + size)  # the matmul's output, fp32 logits, tanh, the cast gradient
    return kept, working


def _certainty_bytes(config, shapes: Shapes, dtype, device: str) -> int:
    """The certainty penalty's memory: its per-row log-sum-exp, entropy and target flag (the scored hidden rows it
    saves are the loss's own, gathered once: counted in the head's part); and its chunk's working set beyond the
    loss's, which runs before or after it, never beside it: fp32 logits, exponentials and their logit-weighted product
    (12 bytes an element, 16 in backward with the cast gradient) against the loss's two casts and two fp32 buffers."""
    from finetune.head import geometry

    text = config.text_config
    rows, cols = geometry(text.vocab_size, torch.device(device))
    n = shapes.decoder_tokens
    kept = n * (4 + 4 + 1)
    beyond = max(0, 16 - (2 * dtype.itemsize + 8))
    return kept + rows * cols * beyond


@dataclass
class Plan:
    profile: str
    device: str
    parts: list = field(default_factory=list)  # (name, bytes, note)
    capacity: int | None = None  # bytes the run may use (after the headroom)
    memory: int | None = None  # the memory planned against: the profile's, or less where the device reports less
    memory_source: str = ""  # where ``memory`` came from, for the verdict
    turns: int = 1  # decoder canvases per example (data.supervise=all: the data's most supervised turns)
    context: int = 0  # outside the allocator (CUDA context); counts for the verdict
    expert_lora: int = 0  # bytes of the peak that LoRA on the experts adds: its weights, gradients, AdamW, activations

    @property
    def peak(self) -> int:
        return sum(b for _, b, _ in self.parts)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.peak + self.context <= self.capacity

    @property
    def close(self) -> bool:
        """Over the memory, but by less than the planner's own measured error (PLAN_ERROR of the prediction)."""
        return self.fits is False and self.peak + self.context - self.capacity <= PLAN_ERROR * (self.peak +
                                                                                                 self.context)


def plan(cfg: DictConfig, turns: int = 1) -> Plan:
    """The predicted peak of one training step of ``cfg`` (composed, checked). ``turns``: with data.supervise=all,
    the most supervised turns in one example of the data (each is a canvas of the decoder pass); `data_turns`
    counts them."""
    from finetune.model import dtype_for

    hardware = settings(cfg.hardware)
    device = hardware.device  # the profile's device, not this machine's: a plan is made before the hardware
    if device == "auto":
        device = "cpu" if hardware.profile == "cpu" else "cuda"
    config = model_config(settings(cfg.model))
    stored = _stored_dtype(config)  # before the meta model takes the run's dtype into the config
    dtype = dtype_for(cfg.model.dtype, device)
    lora = settings(cfg.lora)
    model = _meta_model(config, dtype, lora, cfg.model.attn_implementation)  # eager keeps every score matrix
    shapes = shapes_of(cfg, config.canvas_length, turns)
    objective = cfg.objective
    result = Plan(hardware.profile, device, context=CUDA_CONTEXT if device == "cuda" else 0, turns=shapes.turns)

    quantization = cfg.model.quantization
    processes = cfg.distributed.world_size or 1
    sharded = distributed.strategy(cfg.distributed.strategy, processes) == "fsdp"
    share = processes if sharded else 1  # FSDP: each process holds 1/N of every frozen weight (finetune.distributed)
    per = f", 1/{processes} per process (FSDP)" if sharded else ""
    weights = _weight_parts(model, quantization)
    weights_parts = sum(1 for nbytes in weights.values() if nbytes)
    for part, nbytes in weights.items():
        if nbytes:
            result.parts.append((f"weights: {part}", -(-nbytes // share), _dtype_note(part, dtype, quantization,
                                                                                      cfg.model.quant_type) + per))
    trained = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}.values()
    trainable = sum(p.numel() for _, p in trained)
    on_experts = sum(p.numel() for n, p in trained if ".experts." in n)
    whole = ", whole on every process" if processes > 1 else ""
    if trainable - on_experts:
        result.parts.append(("LoRA weights + gradients + AdamW state", (trainable - on_experts) * 16,
                             f"{trainable - on_experts:,} fp32 parameters x (4 + 4 + 8) bytes{whole}"))
    if on_experts:
        result.parts.append(("expert LoRA weights + grads + AdamW", on_experts * 16,
                             f"{on_experts:,} fp32 parameters x (4 + 4 + 8) bytes: rank {lora.rank_of_experts} on "
                             f"each of {config.text_config.num_experts} experts' gate/up and down{whole}"))
    if sharded:  # the layer pair running now and the next one, gathered whole (forward, and again in backward)
        result.parts.append(("FSDP: gathered layers", 2 * _largest_layer_weights(model),
                             "the largest encoder/decoder layer pair's weights, whole, twice (this one, the next)"))
    if processes > 1:  # DDP (FSDP's LoRA too) keeps the gradients it reduces in buckets of their own
        result.parts.append(("DDP gradient buckets", trainable * 4, "a copy of the LoRA gradients (fp32)"))

    by = _activations(model, shapes, quantization != "none")
    checkpointing = bool(cfg.train.gradient_checkpointing)
    size = dtype.itemsize
    hidden = config.text_config.hidden_size
    kept_enc, kept_dec, other, kv, working = _kept(by, shapes, hidden * size, checkpointing)
    if on_experts:  # the same step without the experts' LoRA: the difference is what it keeps for backward
        without = _kept(_activations(model, shapes, quantization != "none", expert_lora=False), shapes, hidden * size,
                        checkpointing)
        result.expert_lora = on_experts * 16 + max(0, sum((kept_enc, kept_dec, other, kv, working)) - sum(without))
    encoder = any(k.startswith("encoder.") for k in by)
    note = "checkpointed: each layer's input" if checkpointing else "every layer's saved tensors"
    enc_note = f"{shapes.batch} x {shapes.prompt + shapes.response} tokens, {note}"
    result.parts.append(("activations: encoder", kept_enc, enc_note if encoder else "no gradient (frozen encoder)"))
    result.parts.append(("activations: decoder", kept_dec + other,
                         f"{shapes.batch} x {shapes.turns * shapes.canvas} canvas tokens"
                         f"{f' ({shapes.turns} turns)' if shapes.turns > 1 else ''}, {note}"))
    result.parts.append(("KV cache", kv, "encoder keys and values the decoder reads"))
    head_kept, head_working = _head_bytes(config, shapes, dtype, device, objective.encoder_ar_weight > 0)
    result.parts.append(("logits and loss buffers", head_kept + head_working,
                         "one chunk of logits at a time (finetune/head.py)"))
    if objective.get("certainty_weight", 0) > 0:
        result.parts.append(("certainty penalty", _certainty_bytes(config, shapes, dtype, device),
                             "objective.certainty_weight: its per-row sums kept, and its "
                             "chunk's buffers beyond the loss's (finetune/head.py softcapped_entropy)"))
    if objective.self_conditioning_p > 0:
        sc = shapes.decoder_tokens * hidden * (size + 4) * 2
        result.parts.append(("self-conditioning", sc, "a pass without gradient; keeps only its soft embeddings"))
    result.parts.append(("backward working set", int(working),
                         "one layer recomputed and differentiated" if checkpointing else
                         "none above forward's: each layer's saved tensors are freed as its gradients are made"))

    if device == "cpu":  # the load's own peak: the weights and one tensor read but not yet in place
        in_flight = _tensor_in_flight(model, stored)
        beyond = in_flight - sum(b for name, b, _ in result.parts[weights_parts:])
        result.parts.append(("loading: one tensor in flight", max(0, beyond),
                             f"the largest tensor ({in_flight / 1e9:.2f} GB as stored), read whole before it is put "
                             "in place; counted beyond the step's own activations and buffers"))

    result.memory, result.memory_source = _memory(hardware, device)
    result.capacity = None if result.memory is None else int(result.memory * (1 - cfg.plan.headroom))
    return result


def _dtype_note(part, dtype, quantization, quant_type):
    name = str(dtype).replace("torch.", "")
    four = quant_type.upper()
    if part == "dense" and quantization == "all4bit":
        return f"{four} linears (model.quantization=all4bit), {name} norms"
    if part == "experts" and quantization != "none":
        return f"{four}, each expert block-wise (model.quantization={quantization})"
    return name


def _memory(hardware, device: str) -> tuple[int | None, str]:
    """(bytes to plan against, where that figure comes from). A CUDA device this process can see is asked what is
    free on it now (torch.cuda.mem_get_info): a DGX Spark reports ~102 GiB free to CUDA after boot with caches
    dropped, less than its profile's 115 GB, and another process may hold part of any card; the plan takes the
    smaller of that and the profile's hardware.memory_gb, and says which."""
    profile = int(hardware.memory_gb * GB) if hardware.memory_gb is not None else None
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        if profile is None or free < profile:
            said = f"hardware.memory_gb={hardware.memory_gb:g}" if profile is not None else "no hardware.memory_gb"
            return free, (f"free on {torch.cuda.get_device_name()} now (torch.cuda.mem_get_info: {free / GB:.1f} of "
                          f"{total / GB:.1f} GB; {said})")
        return profile, f"hardware.memory_gb (the device has {free / GB:.1f} GB free now)"
    if profile is not None:
        return profile, "hardware.memory_gb"
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024, "available now (/proc/meminfo)"
        except (OSError, KeyError, ValueError):
            return None, ""
    return None, ""


# --- what to change when it does not fit --------------------------------------------------------------------------
def _variants(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """Changes a user can make, smallest first, each as overrides."""
    out = []
    if not cfg.train.gradient_checkpointing:
        out.append(("checkpoint the layers", ["train.gradient_checkpointing=true"]))
    if cfg.lora.targets in ("attn_mlp_experts", "experts"):
        rank = cfg.lora.expert_r or cfg.lora.r
        if rank > 4:
            out.append((f"expert LoRA at rank {rank // 4}", [f"lora.expert_r={rank // 4}"]))
        out.append(("no LoRA on the experts", ["lora.targets=attn_mlp"]))
    prompt = cfg.data.max_prompt_tokens
    for p in (prompt // 2, prompt // 4):
        if p >= 128:
            out.append((f"prompts up to {p} tokens", [f"data.max_prompt_tokens={p}"]))
    if cfg.data.max_response_canvases > 1:
        out.append(("answers of one canvas", ["data.max_response_canvases=1"]))
    if cfg.train.batch_size > 1:
        out.append(("batch 1 (raise train.grad_accum to keep the effective batch)", ["train.batch_size=1"]))
    if cfg.model.quantization == "none":
        out.append(("4-bit experts", ["model.quantization=experts4bit"]))
    if cfg.model.quantization != "all4bit":
        out.append(("4-bit experts and dense linears", ["model.quantization=all4bit"]))
    together = {}  # key -> its last (smallest) value
    for _, overrides in out:
        together.update(o.split("=", 1) for o in overrides)
    if len(out) > 1:
        out.append(("all of the above", [f"{k}={v}" for k, v in together.items()]))
    return out


def suggestions(cfg: DictConfig, turns: int = 1) -> list[tuple[str, list[str], Plan]]:
    """Each variant's plan, smallest change first: those that fit, or all of them when none does."""
    found = []
    for label, overrides in _variants(cfg):
        changed = cfg.copy()
        with open_dict(changed):
            for item in overrides:
                key, value = item.split("=", 1)
                OmegaConf.update(changed, key, yaml.safe_load(value), merge=False)
        found.append((label, overrides, plan(changed, turns)))
    return [f for f in found if f[2].fits] or found


def _gb(nbytes: int) -> str:
    return f"{nbytes / GB:7.2f} GB"


def report(cfg: DictConfig, current: Plan, with_suggestions: bool = True) -> str:
    processes = cfg.distributed.world_size or 1
    each = (f", each of {processes} processes ({distributed.strategy(cfg.distributed.strategy, processes)})"
            if processes > 1 else "")
    lines = [f"plan: {cfg.run_name or 'run'}{each} on {current.profile} ({current.device}), "
             f"{cfg.model.name_or_path}, batch {cfg.train.batch_size}{' per process' if each else ''}, prompt <= "
             f"{cfg.data.max_prompt_tokens}, answer <= {cfg.data.max_response_canvases} canvases, checkpointing "
             f"{'on' if cfg.train.gradient_checkpointing else 'off'}"]
    for name, nbytes, note in current.parts:
        lines.append(f"  {name:40} {_gb(nbytes)}  {note}")
    lines.append(f"  {'predicted peak (allocated)':40} {_gb(current.peak)}")
    if current.context:
        lines.append(f"  {'+ CUDA context (outside the allocator)':40} {_gb(current.context)}")
    if current.device == "cuda":
        lines.append("  (GPU figures checked against measurement on an H200 only: 1.00-1.10 of the measured peak, "
                     "bench/RESULTS.md; a GB10 or RTX card may differ by its allocator and kernels)")
    lines.append(verdict(current))
    if with_suggestions and current.fits is False and not current.close:
        found = suggestions(cfg, current.turns)
        fitting = any(p.fits for _, _, p in found)
        lines.append("changes that make it fit, smallest first (predicted total):" if fitting else
                     "no change here makes it fit (predicted total with each):")
        for label, overrides, changed in found:
            lines.append(f"  {label:60} {_gb(changed.peak + changed.context)}  {' '.join(overrides)}")
        weights = sum(b for n, b, _ in current.parts if n.startswith("weights: "))
        if not fitting and weights > current.capacity / 2:
            lines.append(f"why: the frozen weights alone are {weights / GB:.1f} GB of the {current.capacity / GB:.1f} "
                         "GB this run may use, and the smallest storage here (model.quantization=all4bit) and the "
                         "shortest sequences leave too little for the step")
    return "\n".join(lines)


def verdict(current: Plan) -> str:
    total = current.peak + current.context
    if current.fits is None:
        return f"no verdict: the memory of {current.profile} is unknown (set hardware.memory_gb)"
    margin = current.capacity - total
    share = f"{total / current.memory:.0%} of {current.memory / GB:.3g} GB"
    source = f" ({current.memory_source})" if current.memory_source not in ("", "hardware.memory_gb") else ""
    if current.expert_lora:
        source += (f"; expert LoRA {current.expert_lora / GB:.2f} GB of it ({current.expert_lora / total:.0%}: "
                   "weights, gradients, AdamW state, activations)")
    if current.fits:
        return f"fits: {total / GB:.1f} GB predicted, {share}{source}; {margin / GB:.1f} GB to spare after the headroom"
    if current.close:
        return (f"may not fit: {total / GB:.1f} GB predicted, {share}{source}; {-margin / GB:.1f} GB over, within the "
                f"planner's measured error ({PLAN_ERROR:.0%}): a run starts, watch its first steps' peak")
    return f"does not fit: {total / GB:.1f} GB predicted, {share}{source}; {-margin / GB:.1f} GB over"


def data_turns(cfg: DictConfig) -> tuple[int, str]:
    """(the most supervised turns in one example of data.train, a note) for data.supervise=all, read as the run
    reads it (tokenizer and canvas length without weights); 1 with the reason where it cannot be read here."""
    if cfg.data.supervise != "all":
        return 1, ""
    from finetune.data import load_splits
    from finetune.preflight import tokenizer_and_canvas

    try:
        tokenizer, canvas = tokenizer_and_canvas(cfg)
        examples = load_splits(settings(cfg.data), tokenizer, canvas)[1]
    except (UserError, OSError) as e:
        return 1, f"data.supervise=all: planned with one canvas per example, as the data could not be read here ({e})"
    turns = max((len(e.targets) for e in examples), default=1)
    return turns, (f"data.supervise=all: {turns} canvases per example in the decoder pass, the most supervised turns "
                   "in one example of data.train")


def refuse_if_it_cannot_fit(cfg: DictConfig, turns: int = 1) -> Plan | None:
    """Training's check before it loads: a run whose plan does not fit stops here (plan.enforce=false lets it).
    A hub model whose config is not on this machine yet cannot be planned before its download: it goes on.
    ``turns``: with data.supervise=all, the run checks again once its data is read (`plan`)."""
    if not cfg.plan.enforce:
        return None
    try:
        current = plan(cfg, turns)
    except UserError as e:
        if "is not on this machine" not in str(e):
            raise
        print(f"plan: skipped, {e}")
        return None
    if current.close:
        print(f"plan: {verdict(current)}")
    elif current.fits is False:
        found = suggestions(cfg, turns)
        hint = next((f"; it would with {' '.join(o)}" for _, o, p in found if p.fits), "")
        raise UserError(f"{verdict(current)} on {current.profile}{hint}. The breakdown: python -m finetune.plan "
                        "<the same arguments>; to run anyway: plan.enforce=false")
    return current


def main(argv=None) -> int:
    from finetune.cli import command, show_config
    from finetune.config import check, compose

    def body(overrides, cfg_mode):
        if cfg_mode:
            show_config(overrides, cfg_mode)
            return None
        cfg = compose(overrides)
        check(cfg)
        turns, note = data_turns(cfg)
        if note:
            print(note)
        print(report(cfg, plan(cfg, turns)))
        return None

    return command(argv if argv is not None else sys.argv[1:],
                   "usage: python -m finetune.plan recipe=NAME [hardware=PROFILE] [key=value ...]", body)


if __name__ == "__main__":
    sys.exit(main())
