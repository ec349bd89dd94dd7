"""One real optimizer step (`finetune.train.fit`) over the settings that change what a step computes: corruption,
loss_on, weighting, data.supervise, lora.placement and hardware.bf16. Each case's step must have the loss that the
model's own forward gives for the same noise (sum over the counted tokens / their count), a finite, non-zero gradient
on every LoRA matrix, and the same loss again from the same seed. Paths no single-feature test runs through the
Trainer (corruption=mask, supervise=all, bf16 autocast on CPU) run here.

The cases are a covering set, not the product (3 x 2^5 = 96 steps): every pair of values of every two settings
occurs in some case (checked below), so a fault that shows only when two settings meet is still reached."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from test_lora import randomise_lora
from transformers import TrainerCallback

import finetune.train as train_module
from finetune.data import DataSettings, build_examples
from finetune.model import LoraSettings, attach_lora
from finetune.objective import Noise, ObjectiveConfig, loss_counts
from finetune.tiny import task_rows
from finetune.train import TrainSettings, fit

from conftest import make_model

C = 8
AXES = {
    "corruption": ("uniform", "mask"),
    "loss_on": ("supervised", "corrupted"),
    "weighting": ("flat", "inverse_t"),
    "supervise": ("last", "all"),
    "placement": ("shared", "decoder", "separate"),
    "bf16": (False, True),
}
# Seven cases cover every pair (six cannot: the two cases of a placement would have to differ in each of the five
# two-valued settings, and five such columns cannot all pair up). The first is the default recipe.
CASES = [
    ("uniform", "supervised", "flat", "last", "shared", False),
    ("uniform", "supervised", "flat", "all", "shared", True),
    ("mask", "corrupted", "inverse_t", "last", "shared", True),
    ("uniform", "supervised", "inverse_t", "last", "decoder", True),
    ("mask", "corrupted", "flat", "all", "decoder", False),
    ("uniform", "corrupted", "flat", "last", "separate", True),
    ("mask", "supervised", "inverse_t", "all", "separate", False),
]
# The trainer's loss and the reference below compute the same numbers in a different order (all targets of a row in
# one decoder call with tiled logits, against one stock forward per target with full logits): they differ by
# rounding. fp32: ~1e-7 per operation, grown through 4 layers and vocabulary-wide sums, well inside 1e-5. bf16
# autocast: matmuls accumulate in fp32 and round their outputs to bf16 (eps 2^-7, ~8e-3): a different order flips
# the last bit of some activations, and the loss, a mean over tens of tokens, moves by at most about one eps.
RTOL = {False: 1e-5, True: 1e-2}


def case_id(case):
    return "-".join(f"{key}={value}" for key, value in zip(AXES, case))


def test_the_cases_cover_every_pair_of_values():
    assert all(case[i] in values for case in CASES for i, values in enumerate(AXES.values()))
    for (i, a), (j, b) in itertools.combinations(enumerate(AXES.values()), 2):
        missing = set(itertools.product(a, b)) - {(case[i], case[j]) for case in CASES}
        assert not missing, (list(AXES)[i], list(AXES)[j], missing)


def settings_of(tokenizer, corruption, loss_on, weighting, supervise, placement):
    objective = ObjectiveConfig(corruption=corruption, loss_on=loss_on, weighting=weighting,
                                mask_token_id=tokenizer.mask_token_id if corruption == "mask" else None,
                                # what each placement can train (finetune.run.training_objective refuses the rest)
                                encoder_ar_weight=0.0 if placement == "decoder" else 1.0)
    # two-turn conversations: supervise=all makes two targets of each, last one
    examples, _ = build_examples(task_rows("followup", 4, 0), tokenizer, DataSettings(supervise=supervise), C,
                                 "followup")
    return objective, examples


class Gradients(TrainerCallback):
    """The LoRA gradients the optimizer is about to apply (after clipping: a positive factor)."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def one_step(tokenizer, tmp_path, objective, examples, placement, bf16, monkeypatch):
    """A fresh tiny model with LoRA, one fit step; returns (model, trainer, batch and noise of the step, the loss
    backward ran on, gradients, the dtypes a LoRA layer computed in, the LoRA weights before the step)."""
    model = attach_lora(make_model(tokenizer, seed=0), LoraSettings(r=4, alpha=8, placement=placement))
    # peft starts B at zero, which makes every A's gradient exactly zero at the first step (dL/dA = B^T ...): from
    # random B every LoRA matrix must get a gradient
    randomise_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    seen, trained, dtypes = [], [], set()
    real, compute_loss = train_module.diffusion_loss, train_module.DiffusionTrainer.compute_loss

    def recording(base, batch, cfg, canvas_length, **noise):
        seen.append(({k: v.clone() for k, v in batch.items()}, noise))
        return real(base, batch, cfg, canvas_length, **noise)

    def returning(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        trained.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(train_module, "diffusion_loss", recording)
    monkeypatch.setattr(train_module.DiffusionTrainer, "compute_loss", returning)
    q_proj = model.get_base_model().model.decoder.layers[0].self_attn.q_proj
    hook = q_proj.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    gradients = Gradients()
    settings = TrainSettings(max_steps=1, batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, logging_steps=1, seed=0,
                             report_to="none", disable_tqdm=True)
    try:
        trainer = fit(model, examples, settings, objective, C, tokenizer.pad_token_id, str(tmp_path), bf16=bf16,
                      callbacks=[gradients])
    finally:
        hook.remove()
        monkeypatch.undo()
    (batch, noise), = seen
    return model, trainer, batch, noise, trained, gradients.grads, dtypes, before


def softcapped(base, hidden):
    logits = base.lm_head(hidden).float()
    cap = base.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def reference_loss(base, batch, noise, objective):
    """The step's loss from the model's own forward: each target on its own (its clean context encoded, its noisy
    canvas decoded after it, self-conditioned on the same forward's logits where the coin said so), full logits,
    F.cross_entropy; divided by the counted tokens. Returns (loss, (diffusion tokens, encoder tokens))."""
    diffusion_sum, diffusion_tokens = 0.0, 0
    for i, example in enumerate(batch["target_example"].tolist()):
        k = int(noise["canvas_index"][i])
        start = int(batch["target_start"][i]) + k * C
        clean = batch["target_tokens"][i, k * C:(k + 1) * C]
        noisy = noise["noisy"][i][None]
        context = batch["input_ids"][example:example + 1, :start]  # the prompt and the clean canvases before k
        sc = None
        if noise["self_conditioning"][example]:
            sc = base(input_ids=context, decoder_input_ids=noisy).logits
            if noise["temperature"] is not None:
                sc = sc / noise["temperature"][example]
        logits = base(input_ids=context, decoder_input_ids=noisy, self_conditioning_logits=sc).logits[0]
        ce = F.cross_entropy(logits, clean, reduction="none").double()
        counted = noisy[0] != clean if objective.loss_on == "corrupted" else torch.ones(C, dtype=torch.bool)
        if objective.weighting == "inverse_t":  # CE / t on the counted tokens, over every canvas position
            diffusion_sum += float((ce[counted] / float(noise["t"][i])).sum())
            diffusion_tokens += C
        else:
            diffusion_sum += float(ce[counted].sum())
            diffusion_tokens += int(counted.sum())
    loss = diffusion_sum / diffusion_tokens
    encoder_tokens = int(batch["ar_mask"][:, 1:].sum())
    if objective.encoder_ar_weight > 0:  # next-token CE of the encoder on every response token (and EOS)
        ar_sum = 0.0
        for row in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][row:row + 1]
            logits = softcapped(base, base.model.encoder(input_ids=ids).last_hidden_state)[0, :-1]
            reads = batch["ar_mask"][row, 1:]
            ar_sum += float(F.cross_entropy(logits[reads], ids[0, 1:][reads], reduction="sum"))
        loss += objective.encoder_ar_weight * ar_sum / encoder_tokens
    return loss, (diffusion_tokens, encoder_tokens)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_step_has_the_models_loss_every_lora_gradient_and_repeats(tokenizer, tmp_path, monkeypatch, case):
    corruption, loss_on, weighting, supervise, placement, bf16 = case
    objective, examples = settings_of(tokenizer, corruption, loss_on, weighting, supervise, placement)
    model, trainer, batch, noise, trained, grads, dtypes, before = one_step(tokenizer, tmp_path / "a", objective,
                                                                            examples, placement, bf16, monkeypatch)
    # the premises: the setting is the one taken (bf16 autocast reached the LoRA layers; supervise=all scored two
    # turns per conversation; the mask token is what corrupted the canvas)
    assert dtypes == {torch.bfloat16 if bf16 else torch.float32}
    assert len(batch["target_example"]) == (2 if supervise == "all" else 1) * len(batch["input_ids"])
    clean = batch["target_tokens"].gather(1, noise["canvas_index"][:, None] * C + torch.arange(C))
    changed = noise["noisy"] != clean
    assert changed.any() and (corruption == "uniform" or (noise["noisy"][changed] == tokenizer.mask_token_id).all())

    with torch.no_grad():  # the reference on the weights the step started from
        for name, p in model.named_parameters():
            if name in before:
                p.copy_(before[name])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            expected, tokens = reference_loss(model.get_base_model(), batch, noise, objective)
    counts = loss_counts(batch, Noise(**noise), objective, C)
    assert counts.tolist() == list(tokens)  # what the step divides by are the tokens the reference counted
    # the loss backward ran on, and the one the trace records
    assert trained == [pytest.approx(expected, rel=RTOL[bf16])]
    assert trainer.step_losses == [pytest.approx(expected, rel=RTOL[bf16])]

    assert grads.keys() == before.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name

    _, again, *_ = one_step(tokenizer, tmp_path / "b", objective, examples, placement, bf16, monkeypatch)
    assert again.step_losses == trainer.step_losses
