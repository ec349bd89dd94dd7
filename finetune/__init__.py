"""finetune: LoRA fine-tuning for DiffusionGemma (README.md); the pipeline is finetune.run."""

import logging

# bitsandbytes (model.quantization) warns at import, on CPUs with AVX512-BF16, that an optional kernel package from
# the hub is missing; its plain CPU kernels are what we use, and the line would land in every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
