"""Every assistant turn as its own target, sharing one encoder pass, equals doing each turn on its own."""

import pytest
import torch

from finetune.canvas import Example, collate
from finetune.data import DataSettings, build_examples
from finetune.objective import ObjectiveConfig, diffusion_loss

C = 8
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "count to three"},
    {"role": "assistant", "content": "one two three four"},  # 2 canvases
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "one"},
]


@pytest.mark.parametrize("self_conditioning", [False, True])
def test_all_turns_loss_equals_the_naive_per_turn_sum(tiny_model, tokenizer, self_conditioning):
    settings = DataSettings(train="x", eval=None, supervise="all")
    (example,), _ = build_examples([{"messages": CHAT}], tokenizer, settings, C, "chat")
    assert len(example.targets) == 3 and [t.num_canvases for t in example.targets] == [1, 3, 1]
    cfg = ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0)
    t = torch.tensor([0.3, 0.6, 0.9])
    k = torch.tensor([0, 1, 0])  # the middle turn is scored on its second canvas
    sc = torch.tensor([self_conditioning])
    with torch.no_grad():
        joint = diffusion_loss(tiny_model, collate([example], 0), cfg, C, generator=torch.Generator().manual_seed(0),
                               t=t, canvas_index=k, self_conditioning=sc)
        naive = []
        for i, target in enumerate(example.targets):
            # the turn alone: its own prompt (the conversation before it), encoded on its own
            alone = Example(example.input_ids[: target.start + target.response_len], [target])
            out = diffusion_loss(tiny_model, collate([alone], 0), cfg, C, t=t[i : i + 1], canvas_index=k[i : i + 1],
                                 self_conditioning=sc, noisy=joint.noisy[i : i + 1])
            naive.append(out)
    per_turn = torch.stack([o.per_target_loss[0] for o in naive])
    torch.testing.assert_close(joint.per_target_loss, per_turn, atol=2e-5, rtol=1e-5)
    total_tokens = sum(o.counted_tokens for o in naive)
    assert joint.counted_tokens == total_tokens == 3 * C
    torch.testing.assert_close(joint.diffusion_loss, per_turn.sum() / total_tokens, atol=1e-5, rtol=1e-5)
    assert joint.corrupted.any(1).all()  # every turn's canvas really was noised


def test_turns_of_different_examples_do_not_see_each_other(tiny_model, tokenizer):
    """A batch mixing a 3-target and a 1-target example scores each like it was alone."""
    settings = DataSettings(train="x", eval=None, supervise="all")
    examples, _ = build_examples([{"messages": CHAT}, {"prompt": "q", "completion": "a"}], tokenizer, settings, C, "x")
    cfg = ObjectiveConfig(self_conditioning_p=0.0, encoder_ar_weight=0.0)
    t = torch.tensor([0.5, 0.5, 0.5, 0.5])
    k = torch.tensor([0, 2, 0, 0])
    with torch.no_grad():
        both = diffusion_loss(tiny_model, collate(examples, 0), cfg, C, generator=torch.Generator().manual_seed(1),
                              t=t, canvas_index=k)
        first = diffusion_loss(tiny_model, collate(examples[:1], 0), cfg, C, t=t[:3], canvas_index=k[:3],
                               noisy=both.noisy[:3])
        second = diffusion_loss(tiny_model, collate(examples[1:], 0), cfg, C, t=t[3:], canvas_index=k[3:],
                                noisy=both.noisy[3:])
    torch.testing.assert_close(both.per_target_loss,
                               torch.cat([first.per_target_loss, second.per_target_loss]), atol=2e-5, rtol=1e-5)
