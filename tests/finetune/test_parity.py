"""Training matches inference: the training forward's logits for canvas k equal the logits that transformers'
own `generate()` computes at its first denoising step for the same noisy canvas, after prefilling the prompt
and the clean canvases before k."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from finetune.canvas import collate, fill_response
from finetune.objective import decode, encode, project


class Record(LogitsProcessor):
    """First in generate()'s processor list, so it sees the raw decoder logits of each denoising step."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores, cur_step=None):
        self.seen.append(scores.detach().clone())
        return scores


def generate_logits(model, context_ids, noisy, sc_logits=None):
    """Logits of generate()'s first denoising step on ``noisy``, after prefilling ``context_ids``."""
    rec = Record()
    kwargs = {"self_conditioning_logits": sc_logits} if sc_logits is not None else {}
    with torch.no_grad():
        model.generate(
            input_ids=context_ids[None],
            decoder_input_ids=noisy[None],
            max_new_tokens=model.config.canvas_length,
            max_denoising_steps=1,
            logits_processor=LogitsProcessorList([rec]),
            **kwargs,
        )
    return rec.seen[0][0]


def make_batch(tokenizer, prompts, responses, canvas_length):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    examples = [fill_response(enc(p), enc(r), canvas_length, eos) for p, r in zip(prompts, responses)]
    for e in examples:  # the encoder's sequence holds the real response only; the fill lives in the target
        e.input_ids = e.input_ids[: e.prompt_len] + e.targets[0].tokens
    return collate(examples, tokenizer.pad_token_id), examples


PROMPTS = ["<bos>a prompt longer than the sliding window", "<bos>short"]
RESPONSES = ["the response spans three canvases!", "two canvases here"]


@pytest.mark.parametrize("with_sc", [False, True])
def test_training_logits_equal_generate_logits_for_every_canvas(tiny_model, tokenizer, with_sc):
    model = tiny_model
    C = model.config.canvas_length
    batch, examples = make_batch(tokenizer, PROMPTS, RESPONSES, C)
    assert [e.num_canvases for e in examples] == [5, 3]
    assert batch["input_ids"].shape[1] > model.config.text_config.sliding_window  # sliding path exercised
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, cache = encode(model, batch["input_ids"])  # one causal pass over the right-padded batch
        for k in range(max(e.num_canvases for e in examples)):
            idx = torch.tensor([min(k, e.num_canvases - 1) for e in examples])
            starts = batch["target_start"] + idx * C
            noisy = torch.randint(0, vocab, (len(examples), C), generator=g)
            sc = torch.randn(len(examples), C, vocab, generator=g) * 3 if with_sc else None
            mask = torch.ones(len(examples), dtype=torch.bool) if with_sc else None
            train_logits = project(model, decode(model, noisy, cache, starts, sc, mask))
            for b, e in enumerate(examples):
                context = torch.tensor(e.input_ids[: int(starts[b])])
                ref = generate_logits(model, context, noisy[b], sc[b : b + 1] if with_sc else None)
                torch.testing.assert_close(train_logits[b], ref, atol=2e-5, rtol=1e-5)
    assert ref.std() > 0.1  # the logits compared are not flat


def test_projection_matches_model_forward(tiny_model, tokenizer):
    """`project` (logits only where needed) is the model's own head: lm_head + soft-cap."""
    model = tiny_model
    C = model.config.canvas_length
    batch, _ = make_batch(tokenizer, PROMPTS[1:], RESPONSES[1:], C)
    with torch.no_grad():
        _, cache = encode(model, batch["input_ids"][:, : int(batch["target_start"][0])])
        canvas = batch["target_tokens"][:, :C]
        ours = project(model, decode(model, canvas, cache, batch["target_start"]))
        theirs = model(cache=cache, decoder_input_ids=canvas).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sliding_window_is_respected(tiny_model, tokenizer):
    """A mask that lets sliding layers see the whole prefix differs from generation: the check above has teeth."""
    from finetune import canvas as canvas_mod

    model = tiny_model
    C = model.config.canvas_length
    batch, examples = make_batch(tokenizer, PROMPTS[:1], RESPONSES[:1], C)
    e = examples[0]
    start = torch.tensor([e.prompt_len + 2 * C])
    noisy = torch.randint(0, model.config.text_config.vocab_size, (1, C), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = generate_logits(model, torch.tensor(e.input_ids[: int(start)]), noisy[0])
        _, cache = encode(model, batch["input_ids"])
        original = canvas_mod.decoder_masks
        try:
            import finetune.objective as obj

            obj.decoder_masks = lambda s, n, c, w: original(s, n, c, None) | {
                "sliding_attention": original(s, n, c, None)["full_attention"]
            }
            wrong = project(model, decode(model, noisy, cache, start))
        finally:
            obj.decoder_masks = original
    assert (wrong[0] - ref).abs().max() > 1e-3


def test_training_forward_uses_the_current_argument_names(tiny_model, tokenizer):
    """transformers 5.24 renamed past_key_values= to cache= and warns on every call with the old name."""
    import warnings

    batch = collate([fill_response([2, 10, 11], [12, 13, 14], 8, tokenizer.eos_token_id)], tokenizer.pad_token_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, cache = encode(tiny_model, batch["input_ids"])
        decode(tiny_model, batch["target_tokens"], cache, batch["target_start"])
    assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]


def test_the_scaled_self_conditioning_signal_is_what_generate_feeds_its_next_step(tiny_model, tokenizer):
    """generate() hands denoising step n+1 the logits of step n over step n's temperature (t_max at the first step).
    objective.self_conditioning_temperature trains on that signal: the decoder's own hidden state of step 1, turned
    into the self-conditioning input with tau = t_max, gives exactly generate()'s step-2 logits; the raw signal
    (what the public recipes train on) does not."""
    from finetune.head import soft_embeddings
    from finetune.objective import _SelfConditioning

    model = tiny_model
    C = model.config.canvas_length
    context = torch.tensor(tokenizer("<bos>reverse: abcde", add_special_tokens=False)["input_ids"])
    calls, rec = [], Record()
    hook = model.model.decoder.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((kwargs["decoder_input_ids"].clone(),
                                                     kwargs.get("self_conditioning_logits"),
                                                     out.last_hidden_state.clone())), with_kwargs=True)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            model.generate(input_ids=context[None], max_new_tokens=C, max_denoising_steps=2, t_max=0.8, t_min=0.4,
                           stability_threshold=100, confidence_threshold=1e-9,
                           logits_processor=LogitsProcessorList([rec]))
    finally:
        hook.remove()
    (_, none, first), (canvas, fed, _) = calls[:2]
    assert none is None  # the first step conditions on nothing
    torch.testing.assert_close(fed.float(), rec.seen[0] / 0.8)  # step 2 is fed step 1's logits over t_max
    with torch.no_grad():
        _, cache = encode(model, context[None])

        def second_step(temperature):
            signal = soft_embeddings(model.lm_head, model.model.decoder.embed_tokens, first,
                                     model.final_logit_softcapping, temperature)
            with _SelfConditioning(model, signal, torch.ones(1, dtype=torch.bool)):
                return project(model, decode(model, canvas, cache, torch.tensor([len(context)])))

        torch.testing.assert_close(second_step(torch.full((1, C), 0.8))[0], rec.seen[1][0], atol=2e-5, rtol=1e-5)
        assert (second_step(None)[0] - rec.seen[1][0]).abs().max() > 1e-3
