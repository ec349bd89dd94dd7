"""`python -m finetune.pretrain`: the tiny base pre-trained and cached whole, loadable by the loader every command
uses, and nothing half-written left beside it."""

import os

import torch
from safetensors.torch import load_file

from finetune.config import TinyBaseSettings
from finetune.model import load
from finetune.pretrain import main
from finetune.tiny import base_dir, generation_config


def test_pretrain_caches_a_complete_loadable_base_and_leaves_nothing_else(tmp_path, capsys, one_thread):
    cache = tmp_path / "cache"
    assert main(["model.tiny.steps=2", "model.tiny.rows=32", f"cache_dir={cache}"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]  # the command prints the cached path last
    assert path == base_dir(str(cache), TinyBaseSettings(steps=2, rows=32))
    # the base, renamed into place whole; its temporary directory (and the trainer's files in it) gone
    assert os.listdir(cache) == [os.path.basename(path)]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(path))

    model, tokenizer, _ = load(path, "cpu", "float32")
    saved = load_file(os.path.join(path, "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())  # every weight loaded
    assert model.config.canvas_length == TinyBaseSettings().canvas_length
    assert len(tokenizer) == model.config.text_config.vocab_size
    expected = generation_config(tokenizer, model.config.canvas_length)  # the sampler's settings, not the defaults
    assert (model.generation_config.max_new_tokens, model.generation_config.eos_token_id) == (
        expected.max_new_tokens, expected.eos_token_id)
