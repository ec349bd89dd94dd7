"""Load the base model and tokenizer (hub id, local path, or the built-in tiny one) and attach LoRA."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from finetune.errors import UserError

log = logging.getLogger(__name__)

# Module-name regexes for the text stack. Plain names like "q_proj" would also hit the vision tower's clippable
# linears (which peft cannot wrap) and the self-conditioning MLP; anchoring on `layers.N.` avoids both.
TARGET_PRESETS = {
    "attn_mlp": r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",  # what every public recipe adapts
    "attn": r"self_attn\.(q|k|v|o)_proj",
    "mlp": r"mlp\.(gate|up|down)_proj",
}
STACKS = {
    "encoder": r"model\.encoder\.language_model\.layers\.\d+\.",
    "decoder": r"model\.decoder\.layers\.\d+\.",
}
PLACEMENTS = ("shared", "decoder", "separate")


def resolve_device(name: str, key: str = "hardware.device") -> str:
    """auto | cpu | cuda -> the device to use; asking for cuda without one is the user's error, named by ``key``."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}=cuda but no CUDA device is visible: use {key}=cpu (or auto), or check the driver")
    return name


def dtype_for(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"model.dtype={name!r}: use auto, float32, bfloat16 or float16") from None


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or os.sep == "\\" and "\\" in name


def resolve_model_path(name: str) -> str:
    """A hub id (``org/name``) passes through; anything that looks like a path must exist."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UserError(f"model.name_or_path={name!r} exists but holds no config.json: point it at a saved model")
        return expanded
    if _looks_local(name):
        raise UserError(
            f"model.name_or_path={name!r} does not exist: give a local directory saved with save_pretrained, "
            "a hub id such as google/diffusiongemma-26B-A4B-it, or 'tiny' for the built-in model"
        )
    return name


def load_model(path: str, dtype: torch.dtype, device: str, load_in_4bit: bool = False, attn: str = "sdpa"):
    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        # All text weights are tied between encoder and decoder and the default skip list skips tied weights, so
        # nothing would be quantised; name the modules to keep instead. The fused experts stay bf16 either way.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=[r".*lm_head.*", r".*vision.*", r".*router.*", r".*self_conditioning.*"],
        )
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from None
    return model


def load_tokenizer(path: str):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"could not load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: str = "attn_mlp"  # a key of TARGET_PRESETS
    placement: str = "shared"  # shared | decoder | separate (see lora/default.yaml)


def target_regex(settings: LoraSettings) -> str:
    if settings.targets not in TARGET_PRESETS:
        raise UserError(f"lora.targets={settings.targets!r}: use one of {', '.join(TARGET_PRESETS)}")
    if settings.placement not in PLACEMENTS:
        raise UserError(f"lora.placement={settings.placement!r}: use one of {', '.join(PLACEMENTS)}")
    stacks = ["decoder"] if settings.placement == "decoder" else ["encoder", "decoder"]
    prefix = "(" + "|".join(STACKS[s] for s in stacks) + ")"
    return prefix + TARGET_PRESETS[settings.targets]


def attach_lora(model, settings: LoraSettings) -> PeftModel:
    """Wrap the text stack's linears with LoRA; the router, experts, embeddings and head stay frozen."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_regex(settings),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    if settings.placement == "shared":
        tie_encoder_lora(peft_model)
    return peft_model


def tie_encoder_lora(peft_model) -> int:
    """Make each encoder LoRA layer use its decoder twin's A/B matrices.

    The base model runs one weight-tied stack twice (encoder, then decoder). Sharing the LoRA matrices keeps that
    tie: training updates one delta, both passes use it, and a merge folds one delta into the one shared tensor.
    Saved adapters still carry both names, with equal values, so stock ``PeftModel.from_pretrained`` rebuilds the
    same function.
    """
    from peft.tuners.lora import LoraLayer

    modules = dict(peft_model.named_modules())
    tied = 0
    for name, module in modules.items():
        if not isinstance(module, LoraLayer) or ".encoder.language_model.layers." not in name:
            continue
        twin = modules.get(name.replace(".encoder.language_model.layers.", ".decoder.layers."))
        if not isinstance(twin, LoraLayer):
            raise RuntimeError(f"encoder LoRA layer {name} has no decoder twin")
        for key in module.lora_A:
            module.lora_A[key] = twin.lora_A[key]
            module.lora_B[key] = twin.lora_B[key]
            module.lora_dropout[key] = twin.lora_dropout[key]
        tied += 1
    if tied == 0:
        raise RuntimeError("lora.placement=shared found no encoder LoRA layers to tie")
    return tied


def load_adapter(base, path: str, placement: str | None = None) -> PeftModel:
    """Load a saved adapter onto a base model; re-tie shared encoder/decoder LoRA so training and use agree."""
    model = PeftModel.from_pretrained(base, path)
    if placement == "shared":
        tie_encoder_lora(model)
    return model


def count_parameters(model) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def router_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if re.search(r"\.router\.", n)]
