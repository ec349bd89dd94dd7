"""finetune: LoRA fine-tuning for DiffusionGemma (README.md); the pipeline is finetune.run."""

import logging
import warnings

# bitsandbytes (model.quantization) warns at import, on CPUs with AVX512-BF16, that an optional kernel package from
# the hub is missing; its plain CPU kernels are what we use, and the line would land in every command's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# On those CPUs bitsandbytes also asks `kernels` (a dependency of transformers >= 5.25) for that optional kernel, and
# with HF_HUB_OFFLINE=1 `kernels` logs that it skips the hub's publisher check, on every command, before anything of
# ours. Only that notice is dropped: the logger's other records (a refused or untrusted kernel) still reach stderr.
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
OFFLINE_NOTICE = "Skipping publisher trust check for "


class _DropOfflineTrustNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.getMessage().startswith(OFFLINE_NOTICE)
                    and "offline mode" in record.getMessage())


logging.getLogger(KERNELS_HUB_LOGGER).addFilter(_DropOfflineTrustNotice())

# peft (0.21) reads `model.is_gradient_checkpointing` when it wraps a model, which transformers >= 5.25 deprecates with
# a FutureWarning naming its own line: one line on stderr of every command that a user can do nothing about. Only
# that message is ignored; any other FutureWarning still shows.
GRADIENT_CHECKPOINTING_NOTICE = r"`is_gradient_checkpointing` is deprecated"
warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_NOTICE, category=FutureWarning)
