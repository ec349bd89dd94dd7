"""Load DiffusionGemma with its frozen experts quantised to 4 bits as the checkpoint streams in (model.quantization).

Loading the bf16 model and then quantising it needs the whole bf16 model in memory first (52 GB for the 26B model).
Here transformers' own loader reads the checkpoint one tensor at a time (it loads synchronously whenever a quantizer
quantises on the fly), and a quantizer registered with it turns each expert tensor into its 4-bit storage
(`finetune.quantize.quantize_expert_weight`) the moment it is read, so the bf16 copy of an expert tensor lives only
until its 4-bit storage exists. Everything else (ties, missing and unexpected keys, non-persistent buffers, dtype,
device_map, revision, safetensors-only) stays transformers' `from_pretrained`.

The encoder's layers are tied to the decoder's (the same Parameters): the checkpoint holds one copy and transformers
ties the other to it after loading. A quantised tensor is no Parameter, so each expert tensor keeps an empty
meta-device placeholder Parameter until loading is over (transformers ties the placeholders like any weight), and
`install_experts4bit` then runs every experts module on the storage its placeholder stands for: twins share it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import transformers.modeling_utils
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from finetune.quantize import forget_expert_ties, install_experts4bit, quantize_expert_weight

METHOD = "finetune_experts4bit"  # transformers' registry key: a name no stock quantizer uses
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
EXPERT_KEYS = tuple(f".experts.{t}" for t in EXPERT_TENSORS)


def _is_experts(module) -> bool:
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextExperts

    return isinstance(module, DiffusionGemmaTextExperts)


class Experts4bitConfig(QuantizationConfigMixin):
    """What `from_pretrained(quantization_config=...)` is given: quantise the experts to ``quant_type``."""

    def __init__(self, quant_type: str = "nf4", **kwargs):
        self.quant_method = METHOD
        self.quant_type = quant_type


class QuantizeExpertsOp(ConversionOps):
    """Runs on each expert tensor as it is read: its 4-bit storage replaces it, held for the placeholder Parameter
    it will serve; nothing is loaded into the model (the placeholder stays on the meta device)."""

    def __init__(self, hf_quantizer: Experts4bitQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        module, name = get_module_from_name(model, full_layer_name)
        placeholder = module._parameters[name]
        self.hf_quantizer.storage[id(placeholder)] = (placeholder, quantize_expert_weight(
            value, self.hf_quantizer.quantization_config.quant_type))
        placeholder._is_hf_initialized = True  # loaded: transformers must not initialise it
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class Experts4bitQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.storage: dict[int, tuple] = {}  # id(placeholder Parameter) -> (the placeholder, its 4-bit storage)

    @property
    def quantized_element_size(self) -> float:
        # 4 bits a weight plus one fp32 absmax per 64-weight block: sizes the loader's CUDA allocator warm-up, which
        # would otherwise reserve the bf16 size of the experts on the card
        return 0.5 + 4 / 64

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return name in EXPERT_TENSORS and _is_experts(module)

    def get_quantize_ops(self):
        return QuantizeExpertsOp(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        _install(model, self.storage, self.quantization_config.quant_type)
        self.storage.clear()
        _forget_quantizer(model)
        return model

    def is_serializable(self):
        return False  # the merged export is built from the original bf16 weights, never from these

    @property
    def is_trainable(self) -> bool:
        return True  # frozen 4-bit experts under LoRA


def _register() -> None:
    """Make METHOD known to transformers' quantizer registry once per process."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(Experts4bitConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(Experts4bitQuantizer)


def _same(a, b, experts: int) -> bool:
    """Equal values, one expert at a time (never a whole layer dequantised)."""
    return all(torch.equal(a.dequantize(e, torch.float32), b.dequantize(e, torch.float32)) for e in range(experts))


def _install(model, storage: dict, quant_type: str) -> None:
    """Run every experts module on the 4-bit storage of its placeholders (tied twins hold the same placeholder, so
    they get the same storage). Two checkpoint copies of a tied pair (a checkpoint saved untied: transformers leaves
    both meta placeholders untied) share one storage when their values agree, as transformers ties equal copies;
    a tensor missing from the checkpoint (transformers initialised it, and warned) is quantised from that value."""

    def storage_of(param):
        if id(param) not in storage:
            storage[id(param)] = (param, quantize_expert_weight(param.data, quant_type))
        return storage[id(param)][1]

    by_name = {name: module for name, module in model.named_modules() if _is_experts(module)}
    installed = {name: [storage_of(module._parameters[t]) for t in EXPERT_TENSORS]
                 for name, module in by_name.items()}
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        t_module, _, tensor = target.rpartition(".")
        s_module = source.rpartition(".")[0]
        if target.endswith(EXPERT_KEYS) and t_module in installed and s_module in installed:
            i = EXPERT_TENSORS.index(tensor)
            t, s = installed[t_module][i], installed[s_module][i]
            if t is not s and _same(t, s, by_name[t_module].num_experts):
                installed[t_module][i] = s
    for name, (gate_up, down) in installed.items():
        install_experts4bit(by_name[name], gate_up, down)
    forget_expert_ties(model)  # the twins share their storage by construction now


def _forget_quantizer(model) -> None:
    """Leave the model as `finetune.quantize.quantize_experts` leaves a normally loaded one: no transformers
    quantizer attached (its checks would refuse `.half()` and `.float()`, and `config.quantization_config` would be
    written into any saved config.json, naming a method no other loader knows)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_is_quantized"):
            del config._is_quantized
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def streamed():
    """transformers memory-maps every shard for the whole load, and each page read through a mapping stays in the
    process's resident set until the end: the whole bf16 checkpoint would count, reclaimable or not (a DGX Spark's
    CUDA allocations do not wait for the kernel to reclaim it). safetensors' ``pread`` backend reads each tensor into
    memory of its own instead, freed once quantised. transformers picks the backend itself (pread only on Windows and
    MPS), so its module-level ``safe_open`` is swapped for the duration of the load."""
    original = transformers.modeling_utils.safe_open
    transformers.modeling_utils.safe_open = functools.partial(_safe_open_pread, original)
    try:
        yield
    finally:
        transformers.modeling_utils.safe_open = original


def _safe_open_pread(safe_open, filename, framework, device="cpu", backend="mmap"):
    return safe_open(filename, framework=framework, device=device, backend="pread")


def quantization_config(quant_type: str = "nf4") -> Experts4bitConfig:
    """The ``quantization_config`` that makes `from_pretrained` quantise the experts as they stream in."""
    _register()
    return Experts4bitConfig(quant_type=quant_type)
