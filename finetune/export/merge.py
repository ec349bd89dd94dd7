"""Merge a LoRA adapter into full weights in the released layout: which deltas go where (the encoder/decoder tie),
the merged shards, and the config that goes with them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from finetune.errors import UserError
from finetune.export import staging


@dataclass
class MergePlan:
    tensors: dict  # output key -> base tensor (in the model, not copied)
    lora: dict  # output key -> the LoRA module whose delta is folded in
    untied: bool
    note: str  # how the tie was handled, for the log and the model card
    differing: list = field(default_factory=list)


def _unwrapped(key: str) -> str:
    """A name under the base's own layout: peft's ``.base_layer`` levels dropped (expert LoRA nests them)."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", key)


def _lora_modules(base) -> dict:
    """``<weight key> -> LoRA layer`` for every LoRA-wrapped module of the base model: linears (``.weight``) and
    experts' parameters (peft's ParamWrapper, one per expert tensor: ``.gate_up_proj``, ``.down_proj``)."""
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper

    found = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if isinstance(module, ParamWrapper):
            found[f"{_unwrapped(name)}.{module.parameter_name}"] = module
            continue
        if type(module) is not Linear:
            raise UserError(f"{name} carries a {type(module).__name__} LoRA layer: export merges LoRA on linear "
                            "layers only (export format=adapter instead)")
        if any(module.use_dora.get(a) for a in module.active_adapters):
            raise UserError(f"{name} uses DoRA: export merges plain LoRA only (export format=adapter instead)")
        found[name + ".weight"] = module
    return found


def delta_of(module):
    """The module's weight delta (B @ A * scale, summed over active adapters), fp32, on the module's device; for
    expert LoRA (E, out, in), one delta per expert, computed in fp32 (peft's get_delta_weight rounds to the
    experts' dtype first)."""
    import torch
    from peft.tuners.lora import ParamWrapper

    from finetune.expert_lora import expert_delta

    with torch.no_grad():
        if isinstance(module, ParamWrapper):
            return sum(expert_delta(module, a) for a in module.active_adapters if a in module.lora_A)
        return sum(module.get_delta_weight(a).float() for a in module.active_adapters)


def _base_state(base) -> dict:
    """The base model's state dict under its own names: LoRA wrappers' ``.base_layer.`` dropped, LoRA removed."""
    state = {}
    for key, tensor in base.state_dict(keep_vars=True).items():
        if ".lora_" in key:
            continue
        state[_unwrapped(key)] = tensor.detach()
    return state


def merge_plan(peft_model, untie: bool = False) -> MergePlan:
    """What to write, and whether the released (tied) layout can hold it.

    Encoder and decoder text weights are one tensor (the decoder's name is the one saved). The tied layout can hold
    the merge only when every encoder/decoder pair received the same delta (``lora.placement=shared``, or
    ``separate`` that happens to agree); otherwise refuse, or with ``untie`` write every tensor under its own name
    with its own delta and set ``tie_word_embeddings=false``, which transformers reads as "no ties at all".
    Deltas are computed explicitly: peft's merge_and_unload on a decoder-only adapter adds the delta to the shared
    tensor and so silently changes the encoder too.
    """
    base = peft_model.get_base_model()
    state = _base_state(base)
    loras = _lora_modules(base)
    missing = sorted(set(loras) - set(state))
    if missing:
        raise UserError(f"LoRA layers without a base weight in the state dict: {missing[:3]}")
    tied = dict(getattr(base, "all_tied_weights_keys", None) or {})  # tied copy -> the key that is saved
    members: dict[str, list[str]] = {}
    for key in state:
        members.setdefault(tied.get(key, key), []).append(key)

    differing = []
    chosen = {}  # saved key -> LoRA module carrying the (common) delta
    for source, keys in members.items():
        with_lora = [k for k in keys if k in loras]
        if not with_lora:
            continue
        deltas = {k: delta_of(loras[k]) if k in loras else None for k in keys}
        ref_key = source if source in loras else with_lora[0]
        ref = deltas[ref_key]
        scale = float(ref.abs().max())
        for k, d in deltas.items():
            other = float(d.abs().max()) if d is not None else 0.0
            diff = float((d - ref).abs().max()) if d is not None else scale
            if diff > 1e-5 * max(scale, other) + 1e-12:
                differing.append((k, ref_key, diff, max(scale, other)))
        chosen[source] = loras[ref_key]

    if not differing:
        tensors = {k: t for k, t in state.items() if k not in tied}
        note = (f"Encoder and decoder received identical LoRA deltas on all {len(chosen)} adapted tensors, so each "
                "delta was folded once into the tensor they share; the checkpoint keeps the released tied layout.")
        if untie:
            note += " (untie=true was not needed.)"
        return MergePlan(tensors, chosen, untied=False, note=note)

    pairs = sorted({(k, r) for k, r, _, _ in differing})
    example = differing[0]
    explain = (f"encoder and decoder share one tensor per layer in the released checkpoint, but this adapter gives "
               f"them different deltas on {len(pairs)} tensors (e.g. {example[0]} vs {example[1]}: max difference "
               f"{example[2]:.3g}, delta size {example[3]:.3g})")
    if not untie:
        placement = "decoder-only LoRA leaves the encoder on the base weights" if all(
            ".encoder." in k and k not in loras for k, _, _, _ in differing) else "the deltas differ"
        raise UserError(
            f"cannot merge into the tied layout: {explain}; {placement}, and one tensor cannot hold both (peft's "
            "merge_and_unload would leak the decoder delta into the encoder). Train with lora.placement=shared, "
            "export format=adapter (transformers + peft serve it exactly), or pass untie=true to write separate "
            "encoder and decoder weights (about twice the text weights; vLLM cannot serve that)")
    note = (f"UNTIED: {explain}. The checkpoint therefore stores every encoder and decoder tensor (and lm_head) "
            "under its own name, each with its own delta, and sets tie_word_embeddings=false, which makes "
            "transformers load them untied. It is about twice the size of the released checkpoint, and vLLM cannot "
            "serve it: its DiffusionGemma runs one backbone for both passes and maps model.encoder.language_model.* "
            "and model.decoder.* onto the same weights, so one delta would silently overwrite the other.")
    return MergePlan(dict(state), dict(loras), untied=True, note=note, differing=differing)


def merged_bytes(plan: MergePlan, dtype: str) -> int:
    """The size of the merged weights at ``dtype``: every tensor written, floating ones cast (52 GB for the 26B model
    in bfloat16; twice the text weights when untied)."""
    import torch

    width = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return sum(t.numel() * (width if t.is_floating_point() else t.element_size()) for t in plan.tensors.values())


def write_merged(plan: MergePlan, directory: str, dtype: str, max_shard_size="5GB") -> dict:
    """Shards of merged weights (one shard in memory at a time), then the index. Returns the index."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    out_dtype = getattr(torch, dtype)

    def target_dtype(t):
        return out_dtype if t.is_floating_point() else t.dtype

    meta = {k: torch.empty(t.shape, dtype=target_dtype(t), device="meta") for k, t in plan.tensors.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard, seen = {}, set()
        for name in names:
            t = plan.tensors[name]
            if name in plan.lora:
                delta = delta_of(plan.lora[name])
                t = (t.float() + delta.to(t.device)).to(out_dtype)
            else:
                t = t.to(target_dtype(t))
            t = t.contiguous().cpu()
            if t.data_ptr() in seen:  # untied copies of one base tensor: safetensors refuses aliases
                t = t.clone()
            seen.add(t.data_ptr())
            shard[name] = t
        staging.write_shard(shard, os.path.join(directory, filename))
        del shard
    index = None
    if split.is_sharded:
        total = sum(t.numel() for t in meta.values())
        index = {"metadata": {"total_parameters": total, **split.metadata}, "weight_map": split.tensor_to_filename}
        staging.write_json(index, os.path.join(directory, "model.safetensors.index.json"))
    return index


def merged_config(base, dtype: str, untied: bool):
    import copy

    import torch

    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.dtype = getattr(torch, dtype)
    if untied:
        config.tie_word_embeddings = False  # DiffusionGemmaConfig: False undoes every tie, encoder/decoder included
    return config
