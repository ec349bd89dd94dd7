"""Gradient checkpointing of encoder and decoder (finetune/checkpointing.py) keeps gradients and the cache intact."""

import torch
from test_lora import randomise_lora
from test_objective import batch_of

from conftest import make_model

from finetune import checkpointing
from finetune.model import LoraSettings, attach_lora, text_layers
from finetune.objective import ObjectiveConfig, diffusion_loss
from finetune.train import TrainSettings, compile_layers, prepare


def lora_grads(model, batch):
    model.zero_grad()
    out = diffusion_loss(model.get_base_model(), batch, ObjectiveConfig(encoder_ar_weight=1.0), 8,
                         generator=torch.Generator().manual_seed(2), self_conditioning=torch.tensor([1, 0, 1, 1]) > 0)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_encoder_and_decoder_give_identical_gradients_and_write_the_cache_once(tiny_model, tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared")).train()
    randomise_lora(model)  # B starts at zero: give every LoRA matrix a value that matters
    batch = batch_of(tokenizer, 4)
    loss, grads = lora_grads(model, batch)

    base = model.get_base_model()
    encoder_runs, decoder_runs, writes = [], [], []
    hooks = [base.model.encoder.language_model.layers[0].self_attn.register_forward_hook(
                 lambda *a: encoder_runs.append(1)),
             base.model.decoder.layers[0].self_attn.register_forward_hook(lambda *a: decoder_runs.append(1))]
    from transformers import DynamicCache

    update = DynamicCache.update

    def counting_update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            writes.append(key_states.shape[-2])
        return update(self, key_states, value_states, layer_idx, *args, **kwargs)

    checkpointing.enable(model)
    DynamicCache.update = counting_update
    try:
        checked_loss, checked_grads = lora_grads(model, batch)
    finally:
        DynamicCache.update = update
        checkpointing.disable(model)
        for h in hooks:
            h.remove()

    # the layers did run again in backward: encoder once more, decoder once more for the pass with gradient
    assert len(encoder_runs) == 2 and len(decoder_runs) == 3, (encoder_runs, decoder_runs)
    assert writes == [batch["input_ids"].shape[1]]  # one write of the whole sequence: the replay appended nothing
    torch.testing.assert_close(checked_loss, loss, atol=0, rtol=0)
    assert checked_grads.keys() == grads.keys()
    encoder_side = [n for n in grads if ".encoder." in n]
    assert encoder_side and all(grads[n].abs().max() > 0 for n in encoder_side)
    for name, grad in grads.items():
        torch.testing.assert_close(checked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_train_gradient_checkpointing_covers_both_passes_and_disable_restores_plain_layers(tiny_model):
    prepare(tiny_model, TrainSettings(gradient_checkpointing=True))
    layer = checkpointing.encoder_layers(tiny_model)[0]
    assert "forward" in layer.__dict__ and tiny_model.model.decoder.layers[0].gradient_checkpointing
    checkpointing.disable(tiny_model)
    assert "forward" not in layer.__dict__ and not tiny_model.model.decoder.layers[0].gradient_checkpointing


class CountingBackend:
    """A dynamo backend that runs each graph eagerly and records which text layers it compiled a graph of (told
    apart by their own `layer_scalar` buffers, which the encoder and decoder twins do not share) and each run of a
    graph, with or without gradient."""

    def __init__(self, layers):
        self.owner = {b.data_ptr(): i for i, layer in enumerate(layers) for b in layer.buffers()}
        self.graphs = []  # per compiled graph: the indices (into layers) of the layers whose buffers it reads
        self.calls = []  # (graph, grad enabled) per run of a compiled graph

    def __call__(self, gm, example_inputs):
        index = len(self.graphs)
        self.graphs.append({self.owner[t.data_ptr()] for t in example_inputs
                            if isinstance(t, torch.Tensor) and t.data_ptr() in self.owner})

        def run(*args):
            self.calls.append((index, torch.is_grad_enabled()))
            return gm.forward(*args)

        return run

    def runs(self):
        """{(layer, grad enabled)} of every compiled run."""
        return {(layer, grad) for graph, grad in self.calls for layer in self.graphs[graph]}


def test_compiled_layers_with_checkpointing_train_to_the_same_loss_and_gradients(tokenizer, monkeypatch):
    """train.compile wraps every text layer in torch.compile; traced here with an eager counting backend (the wiring,
    the cache writes and the checkpoint replay under dynamo), not inductor's minutes of C++ compilation."""
    # Each layer and grad mode is a variant of one compiled function: past dynamo's recompile limit (default 8, just
    # what 4 decoder layers x 2 passes need here) the rest would silently run eager. From a limit of 1, only
    # compile_layers raising it lets every layer compile.
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    batch = batch_of(tokenizer, 4)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = attach_lora(make_model(tokenizer), LoraSettings(r=4, alpha=8, placement="shared")).train()
        randomise_lora(model)
        prepare(model, TrainSettings(gradient_checkpointing=True))
        if compiled:
            layers = text_layers(model)
            backend = CountingBackend(layers)
            compile_layers(model, backend=backend)
        results.append(lora_grads(model, batch))
    # The step ran through dynamo's graphs: every decoder layer compiled, and run compiled in both of its passes
    # (self-conditioning's without gradient, then the one with). The encoder layers stay eager under checkpointing
    # (their cache write breaks the graph, as train.compile's comment says), so no graph of theirs.
    decoder = {i for i, layer in enumerate(layers) if layer in list(model.get_base_model().model.decoder.layers)}
    assert set().union(*backend.graphs) == decoder and all(len(g) == 1 for g in backend.graphs), backend.graphs
    assert backend.runs() == {(i, grad) for i in decoder for grad in (False, True)}, backend.runs()
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
