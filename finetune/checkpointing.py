"""Gradient checkpointing of both passes: the decoder's layers and the encoder's, with the KV cache written once.

transformers checkpoints the decoder layers (they only read the cache) but not the encoder layers: each appends its
keys and values to the shared cache while it runs, and replaying it in backward would append them a second time.
With ``lora.placement=shared`` the encoder runs with gradient over the whole prompt + response, so leaving it
unchecked keeps every encoder activation alive until backward.

Here each encoder layer runs under non-reentrant `torch.utils.checkpoint` and sees the cache through `_WriteOnce`:
the first run writes and remembers what the cache returned; the replay in backward gets that same result back and
writes nothing. The keys and values in the cache are the first run's tensors, so the decoder's gradient flows into
them and from there into the replayed layer (tests/finetune/test_checkpointing.py: identical gradients, cache
length unchanged).
"""

from __future__ import annotations

import functools
import types

import torch
from torch.utils.checkpoint import checkpoint

from finetune.model import base_of


class _WriteOnce:
    """The cache as one checkpointed layer call sees it: `update` writes on the first run only."""

    def __init__(self, cache):
        self._cache = cache
        self._written = None

    def update(self, *args, **kwargs):
        if self._written is None:
            self._written = self._cache.update(*args, **kwargs)
        return self._written

    def __getattr__(self, name):  # everything else (lengths, masks) reads the real cache
        if name.startswith("_"):  # not our own fields (copies and tracers look them up before __init__ ran)
            raise AttributeError(name)
        return getattr(self._cache, name)


def _checkpointed_forward(layer, hidden_states, *args, cache=None, **kwargs):
    run = functools.partial(type(layer).forward, layer)
    if not (layer.training and torch.is_grad_enabled()):
        return run(hidden_states, *args, cache=cache, **kwargs)
    return checkpoint(run, hidden_states, *args, cache=None if cache is None else _WriteOnce(cache),
                      use_reentrant=False, **kwargs)


def encoder_layers(model):
    return list(base_of(model).model.encoder.language_model.layers)


def enable(model) -> None:
    """Checkpoint every encoder and decoder layer of ``model`` (a DiffusionGemma or a PeftModel around one)."""
    base = base_of(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in encoder_layers(base):
        layer.forward = types.MethodType(_checkpointed_forward, layer)  # an instance attribute: disable() drops it


def disable(model) -> None:
    base = base_of(model)
    base.gradient_checkpointing_disable()
    for layer in encoder_layers(base):
        layer.__dict__.pop("forward", None)
