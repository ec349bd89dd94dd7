import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real entry points (still run in CI)")


@pytest.fixture(scope="session")
def tokenizer():
    from finetune.tiny import build_tokenizer

    return build_tokenizer()


def make_model(tokenizer, seed=0, canvas_length=8, init=0.1):
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.tiny import build_config

    cfg = build_config(tokenizer, canvas_length=canvas_length)
    cfg.text_config.initializer_range = init  # larger than default so logits are far from uniform
    cfg.initializer_range = init
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(tokenizer)
