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
