"""Library output that is not ours stays off the user's stderr, and only that output: a real warning still shows."""

import logging

import pytest

import finetune


def test_kernels_offline_trust_notice_is_dropped_and_its_other_warnings_are_not(caplog):
    # what bitsandbytes triggers at import on CPUs with AVX512-BF16 when the hub is offline (transformers >= 5.25
    # installs `kernels`): the real function, called as bitsandbytes' get_kernel calls it
    hf_hub = pytest.importorskip("kernels._internals.hf_hub")
    assert hf_hub.logger.name == finetune.KERNELS_HUB_LOGGER, "kernels moved its logger: update finetune/__init__.py"
    with caplog.at_level(logging.WARNING):
        hf_hub._check_trust_remote_code("kernels-community/quantization-bitsandbytes", local_files_only=True,
                                        trust_remote_code=False)
        assert caplog.records == []
        hf_hub.logger.warning("Kernel repository 'x/y' could not verify publisher trust status.")
    assert [r.getMessage() for r in caplog.records] == ["Kernel repository 'x/y' could not verify publisher trust "
                                                        "status."]



WRAP = """
import warnings
import finetune
{unfilter}
from transformers import DiffusionGemmaForBlockDiffusion
from finetune.model import LoraSettings, attach_lora
from finetune.tiny import build_config, build_tokenizer
attach_lora(DiffusionGemmaForBlockDiffusion(build_config(build_tokenizer())), LoraSettings(r=2))
warnings.warn("another deprecation", FutureWarning)
"""
UNFILTER = "warnings.filters[:] = [f for f in warnings.filters if not (f[1] and 'is_gradient' in f[1].pattern)]"


def test_peft_reading_the_deprecated_checkpointing_flag_is_quiet_and_other_future_warnings_are_not():
    """peft wraps a model by reading `is_gradient_checkpointing`, which transformers deprecates: that one notice would
    land in every command's output, so it is dropped; a FutureWarning of any other text still shows. In a process of
    its own, with Python's default filters (pytest installs its own)."""
    import subprocess
    import sys

    from conftest import ROOT

    def stderr(unfilter: str) -> str:
        return subprocess.run([sys.executable, "-c", WRAP.format(unfilter=unfilter)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300).stderr

    quiet, loud = stderr(""), stderr(UNFILTER)
    assert "is_gradient_checkpointing" in loud, loud  # peft still triggers it: the filter has something to do
    assert "is_gradient_checkpointing" not in quiet and "another deprecation" in quiet, quiet
