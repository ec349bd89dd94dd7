"""Unit tests of the block-diffusion objective on a tiny random DiffusionGemma."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from finetune.canvas import collate, fill_response
from finetune.model import LoraSettings, attach_lora, router_parameters
from finetune.objective import ObjectiveConfig, decode, diffusion_loss, encode, project
from finetune.train import TrainSettings, fit

C = 8


def batch_of(tokenizer, n, seed=0, with_examples=False):
    import random

    rng = random.Random(seed)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 14)))
        examples.append(fill_response(enc("<bos>copy: " + word + "\n"), enc(word), C, tokenizer.eos_token_id))
    batch = collate(examples, tokenizer.pad_token_id)
    return (batch, examples) if with_examples else batch


def test_fill_response_always_ends_with_eos_and_fills_whole_canvases():
    ex = fill_response([5, 6], [7] * 8, 8, eos_id=1)  # response exactly one canvas long
    assert ex.num_canvases == 2 and ex.targets[0].tokens == [7] * 8 + [1] * 8
    assert ex.input_ids == [5, 6] + [7] * 8 + [1]  # the encoder reads the response and one EOS
    ex = fill_response([5], [7, 7, 7], 8, eos_id=1)
    assert ex.num_canvases == 1 and ex.targets[0].tokens == [7, 7, 7] + [1] * 5
    assert ex.targets[0].ar_len == 4


def test_observed_corruption_rate_tracks_t(tiny_model, tokenizer):
    batch = batch_of(tokenizer, 128)
    cfg = ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0)
    vocab = tiny_model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    for t in (0.1, 0.5, 0.9):
        with torch.no_grad():
            out = diffusion_loss(tiny_model, batch, cfg, C, generator=g, t=torch.full((128,), t))
        rate = out.corrupted.float().mean().item()
        # 1024 Bernoulli draws: 4 sigma is < 0.04; a uniform draw can hit the clean token, which corrupts nothing
        assert abs(rate - t * (1 - 1 / vocab)) < 0.04, (t, rate)
        assert torch.equal(out.corrupted, out.noisy != out.targets)
    with torch.no_grad():
        out = diffusion_loss(tiny_model, batch, cfg, C, generator=g)
    per_example = out.corrupted.float().mean(1)
    assert torch.corrcoef(torch.stack([per_example, out.t]))[0, 1] > 0.8  # sampled t drives the rate
    assert out.t.min() >= cfg.t_min and out.t.max() <= 1.0


def test_the_loss_drawing_its_own_noise_scores_what_training_scores_on_that_noise(tiny_model, tokenizer):
    """One sampler: `diffusion_loss` given no noise (the held-out loss's path) draws it with `draw_noise`, so with
    loss_on=corrupted a noise token that hit the clean one is not counted, as training does not count it."""
    batch = batch_of(tokenizer, 64)
    cfg = ObjectiveConfig(loss_on="corrupted", self_conditioning_p=0.0, encoder_ar_weight=0.0)
    with torch.no_grad():
        drawn = diffusion_loss(tiny_model, batch, cfg, C, generator=torch.Generator().manual_seed(0),
                               t=torch.ones(64))  # every position replaced
        assert (drawn.noisy == drawn.targets).any()  # and some replacements drew the clean token
        trained = diffusion_loss(tiny_model, batch, cfg, C, t=drawn.t, canvas_index=drawn.canvas_index,
                                 noisy=drawn.noisy, self_conditioning=torch.zeros(64, dtype=torch.bool))
    assert drawn.counted_tokens == trained.counted_tokens == int((drawn.noisy != drawn.targets).sum())
    torch.testing.assert_close(drawn.loss, trained.loss)


def test_eager_attention_reads_the_training_masks_as_sdpa_does(tokenizer):
    """model.attn_implementation=eager adds its mask to the scores: the boolean masks must reach it as 0 / -inf-like
    floats, or every key would be seen (the loss moved by ~0.5 on this model)."""
    batch = batch_of(tokenizer, 4)
    cfg = ObjectiveConfig(self_conditioning_p=0.5)
    losses = {}
    for attn in ("sdpa", "eager"):
        model = make_model(tokenizer)
        model.set_attn_implementation(attn)
        with torch.no_grad():
            losses[attn] = diffusion_loss(model, batch, cfg, C, generator=torch.Generator().manual_seed(0)).loss
    torch.testing.assert_close(losses["eager"], losses["sdpa"], atol=1e-5, rtol=1e-5)


def test_canvas_choice_is_uniform_over_each_examples_canvases(tiny_model, tokenizer):
    batch = batch_of(tokenizer, 64)
    cfg = ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0)
    counts = torch.zeros(64, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(30):
            idx = diffusion_loss(tiny_model, batch, cfg, C, generator=g).canvas_index
            assert (idx < batch["num_canvases"]).all() and (idx >= 0).all()
            counts[torch.arange(64), idx] += 1
    two = batch["num_canvases"] == 2
    assert two.any() and (~two).any()
    assert counts[two][:, 1].sum() / counts[two].sum() == pytest.approx(0.5, abs=0.08)


def manual_ce(model, batch, out, positions):
    """CE at ``positions`` (B, C bool) recomputed from the returned noisy canvas, outside the objective."""
    _, cache = encode(model, batch["input_ids"])
    starts = batch["target_start"] + out.canvas_index * C
    logits = project(model, decode(model, out.noisy, cache, starts))
    clean = batch["target_tokens"].gather(1, out.canvas_index[:, None] * C + torch.arange(C)[None])
    return F.cross_entropy(logits[positions], clean[positions], reduction="none"), positions


@pytest.mark.parametrize(
    "loss_on,weighting", [("supervised", "flat"), ("corrupted", "flat"), ("corrupted", "inverse_t")]
)
def test_loss_counts_exactly_the_positions_the_settings_say(tiny_model, tokenizer, loss_on, weighting):
    batch = batch_of(tokenizer, 6)
    cfg = ObjectiveConfig(loss_on=loss_on, weighting=weighting, self_conditioning_p=0.0, encoder_ar_weight=0.0)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8, 0.5, 0.3])
    with torch.no_grad():
        out = diffusion_loss(tiny_model, batch, cfg, C, generator=torch.Generator().manual_seed(3), t=t)
        every = torch.ones_like(out.corrupted)
        positions = out.corrupted if loss_on == "corrupted" else every
        ce, _ = manual_ce(tiny_model, batch, out, positions)
    assert out.counted_tokens == int(positions.sum())
    if weighting == "flat":
        expected = ce.mean()
    else:
        expected = (ce / t[:, None].expand_as(positions)[positions]).sum() / every.sum()
    torch.testing.assert_close(out.diffusion_loss, expected, atol=1e-5, rtol=1e-5)


def test_mask_corruption_puts_the_mask_token_exactly_on_the_corrupted_positions(tiny_model, tokenizer):
    # Fails if nothing is corrupted (a corruption rate of 0 once passed this test vacuously).
    batch = batch_of(tokenizer, 8)
    mask_id = tokenizer.mask_token_id
    cfg = ObjectiveConfig(corruption="mask", mask_token_id=mask_id, self_conditioning_p=0.0, encoder_ar_weight=0.0)
    with torch.no_grad():
        out = diffusion_loss(tiny_model, batch, cfg, C, generator=torch.Generator().manual_seed(0),
                             t=torch.full((8,), 0.5))
    # the clean canvases, read from the batch rather than from the objective's own output
    clean = batch["target_tokens"].gather(1, out.canvas_index[:, None] * C + torch.arange(C)[None])
    assert not (clean == mask_id).any()  # so a mask id in the canvas can only come from corruption
    assert 16 <= int(out.corrupted.sum()) <= 48  # t=0.5 over 64 positions: about half, and surely some
    assert torch.equal(out.noisy == mask_id, out.corrupted)  # the mask id exactly where corrupted
    assert torch.equal(out.noisy[~out.corrupted], clean[~out.corrupted])  # the rest untouched


def test_encoder_ar_loss_is_next_token_ce_on_response_and_first_eos(tiny_model, tokenizer):
    batch, batch_examples = batch_of(tokenizer, 4, with_examples=True)
    cfg = ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.5)
    with torch.no_grad():
        out = diffusion_loss(tiny_model, batch, cfg, C, generator=torch.Generator().manual_seed(0))
        hidden, _ = encode(tiny_model, batch["input_ids"])
        ces = []
        for b in range(4):
            p, r = int(batch["target_start"][b]), batch_examples[b].targets[0].response_len
            logits = project(tiny_model, hidden[b, p - 1 : p + r])  # predicts tokens p .. p+r (last is EOS)
            target = batch["input_ids"][b, p : p + r + 1]
            assert target[-1] == tokenizer.eos_token_id
            ces.append(F.cross_entropy(logits, target, reduction="none"))
    torch.testing.assert_close(out.ar_loss, torch.cat(ces).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.diffusion_loss + 0.5 * out.ar_loss, atol=1e-5, rtol=1e-5)


def test_self_conditioning_first_pass_carries_no_gradient(tiny_model, tokenizer):
    model = tiny_model.train()
    batch = batch_of(tokenizer, 4)
    cfg = ObjectiveConfig(self_conditioning_p=1.0, encoder_ar_weight=0.0)
    calls = []
    handle = model.model.decoder.register_forward_hook(
        lambda mod, args, kwargs_out: calls.append(kwargs_out.last_hidden_state.requires_grad)
    )
    g = torch.Generator().manual_seed(0)
    try:
        out = diffusion_loss(model, batch, cfg, C, generator=g)
    finally:
        handle.remove()
    assert calls == [False, True]  # first pass built no graph, second does
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # Same loss with the first pass's logits handed in as constants: identical gradients.
    _, cache = encode(model, batch["input_ids"])
    starts = batch["target_start"] + out.canvas_index * C
    with torch.no_grad():
        sc = project(model, decode(model, out.noisy, cache, starts))
    clean = out.targets
    logits = project(model, decode(model, out.noisy, cache, starts, sc.detach(), torch.ones(4, dtype=torch.bool)))
    F.cross_entropy(logits.flatten(0, 1), clean.flatten()).backward()
    # fp32 rounding apart: the objective builds the self-conditioning signal and the loss from tiles of logits
    # (finetune/head.py), this reference from full ones; both are ~1e-5 from a float64 computation on gradients
    # of size ~3, where a gradient through the first pass would move them by ~0.1
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-4)


def test_self_conditioning_is_per_example(tiny_model, tokenizer):
    """In one diffusion_loss call with self-conditioning on for some examples and off for others, each example's loss
    is the one it gets alone with its own setting. (Fails if SC is applied to the whole batch when any example has
    it: checked by passing `torch.ones_like(self_conditioning)` to the second decode.)"""
    batch, examples = batch_of(tokenizer, 4, seed=2, with_examples=True)
    cfg = ObjectiveConfig(self_conditioning_p=0.5, encoder_ar_weight=0.0)
    sc = torch.tensor([True, False, True, False])
    with torch.no_grad():
        mixed = diffusion_loss(tiny_model, batch, cfg, C, generator=torch.Generator().manual_seed(5),
                               t=torch.full((4,), 0.7), self_conditioning=sc)

        def alone(i, on):
            return diffusion_loss(tiny_model, collate([examples[i]], tokenizer.pad_token_id), cfg, C,
                                  t=mixed.t[i : i + 1], canvas_index=mixed.canvas_index[i : i + 1],
                                  noisy=mixed.noisy[i : i + 1], self_conditioning=torch.tensor([on])).per_target_loss[0]

        for i in range(4):
            with_sc, without_sc = alone(i, True), alone(i, False)
            assert (with_sc - without_sc).abs() > 1e-3, i  # SC changes this example's loss, so the test can tell
            torch.testing.assert_close(mixed.per_target_loss[i], with_sc if sc[i] else without_sc,
                                       atol=1e-5, rtol=1e-5)


def test_router_gets_no_gradient_and_does_not_move(tiny_model, tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8))
    routers = router_parameters(model)
    assert routers and all(not p.requires_grad for _, p in routers)
    before = {n: p.detach().clone() for n, p in routers}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = diffusion_loss(model.get_base_model(), batch_of(tokenizer, 4), ObjectiveConfig(), C)
    out.loss.backward()
    assert all(p.grad is None for _, p in routers)
    opt.step()
    for n, p in routers:
        assert torch.equal(p, before[n]), n
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("vision" in n or "self_conditioning" in n or "experts" in n for n in trainable)


def train_two_steps(model, tokenizer, tmp_path):
    """Two real optimizer steps through the project's Trainer (`finetune.train.fit`), the path a run takes."""
    _, examples = batch_of(tokenizer, 8, with_examples=True)
    settings = TrainSettings(max_steps=2, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, report_to="none",
                             disable_tqdm=True, logging_steps=1)
    fit(model, examples, settings, ObjectiveConfig(), C, tokenizer.pad_token_id, str(tmp_path))


def encoder_decoder_pairs(state):
    """(encoder name, decoder twin name) for every encoder text-stack tensor in a state dict."""
    pairs = [(k, k.replace(".encoder.language_model.", ".decoder.")) for k in state if ".encoder.language_model." in k]
    assert pairs and all(dec in state for _, dec in pairs)
    return pairs


# The two tests below compare values, not object identity: identity cannot tell whether a training step kept the
# two stacks equal. Checked by deep-copying `model.model.encoder.language_model.layers` (peft: the base model's) in
# `finetune.train.fit` before the Trainer is built: both tests then fail, while identity checks on a hand-rolled
# optimizer step did not notice.
def test_tied_encoder_decoder_weights_stay_equal_after_real_steps(tiny_model, tokenizer, tmp_path):
    model = tiny_model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_two_steps(model, tokenizer, tmp_path)
    after = {k: v.detach() for k, v in model.state_dict().items()}
    pairs = encoder_decoder_pairs(after)
    changed = [dec for _, dec in pairs if not torch.equal(after[dec], before[dec])]
    for i in range(tiny_model.config.text_config.num_hidden_layers):  # the step did train the shared stack
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "experts.gate_up_proj"):
            assert f"model.decoder.layers.{i}.{name}" in changed, (i, name)
    for enc, dec in pairs:
        assert torch.equal(after[enc], after[dec]), enc
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["model.encoder.language_model.embed_tokens.weight"], after["lm_head.weight"])
    assert torch.equal(after["model.decoder.embed_tokens.weight"], after["lm_head.weight"])


def test_shared_lora_stays_equal_in_encoder_and_decoder_after_real_steps(tiny_model, tokenizer, tmp_path):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="shared"))
    lora = lambda: {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}  # noqa: E731
    before = lora()
    train_two_steps(model, tokenizer, tmp_path)
    after = lora()
    pairs = encoder_decoder_pairs(after)
    assert len(pairs) == sum(".decoder.layers." in k for k in after)  # every decoder LoRA tensor has a twin
    for enc, dec in pairs:
        assert not torch.equal(after[dec], before[dec]), dec  # B left zero, A moved by the second step
        assert torch.equal(after[enc], after[dec]), enc


def test_decoder_placement_leaves_encoder_frozen_and_runs_it_without_graph(tiny_model, tokenizer):
    model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8, placement="decoder"))
    base = model.get_base_model()
    assert not any(p.requires_grad for p in base.model.encoder.parameters())
    model.train()
    out = diffusion_loss(base, batch_of(tokenizer, 4), ObjectiveConfig(encoder_ar_weight=0.0), C)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
