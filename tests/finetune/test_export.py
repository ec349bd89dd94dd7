"""Export on the tiny model: the adapter and the merged checkpoint reload (in a fresh process and here) to the
fine-tuned model's logits and tokens; the encoder/decoder tie is kept, refused or deliberately undone, for our runs
and for adapters saved by stock peft; the check catches a lost or doubled delta even at bfloat16; a crash mid-write
leaves nothing that looks complete; the CLI, the model card, README and the playbooks agree with what is written."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from finetune import export as ex
from finetune.errors import UserError
from finetune.export import cli, merge, staging, verify
from finetune.model import LoraSettings, attach_lora
from finetune.run import save_adapter

from conftest import ROOT, make_model
CANVAS = 8
METRICS = {
    "run_name": "tiny",
    "training": {"steps": 5, "loss_first": 3.5, "loss_last": 1.25, "seconds": 1.0},
    "data": {"train": {"read": 100, "kept": 99}, "eval": {"read": 8, "kept": 8}},
    "eval": {"examples": 8,
             "base": {"heldout_loss_mean": 4.1, "exact_match": 0.0, "tokens_per_forward": 1.5,
                      "heldout_loss_by_t": {"0.1": 3.0, "0.9": 5.0}},
             "adapter": {"heldout_loss_mean": 0.0119, "exact_match": 1.0, "tokens_per_forward": 4.0,
                         "heldout_loss_by_t": {"0.1": 0.01, "0.9": 0.02}}},
}


def randomise_lora(model, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def copy_decoder_lora_to_encoder(peft_model):
    """Separately wrapped encoder/decoder LoRA made equal: what a shared adapter looks like to stock peft."""
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, m in modules.items():
            if ".encoder.language_model.layers." in name and hasattr(m, "lora_A"):
                twin = modules[name.replace(".encoder.language_model.layers.", ".decoder.layers.")]
                m.lora_A["default"].weight.copy_(twin.lora_A["default"].weight)
                m.lora_B["default"].weight.copy_(twin.lora_B["default"].weight)


def logits(model, ids, canvas):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=canvas).logits


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, 100, (2, 20), generator=g), torch.randint(10, 100, (2, CANVAS), generator=g)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny base saved like the cached one: weights, tokenizer and a generation config.

    Initialised at 0.05, not conftest's 0.1: at 0.1 the random model is chaotic under self-conditioning (each
    denoising step feeds softmax(logits) back in), so a 1e-5 logit difference, which any float32 merge has
    (x @ (W + BA) vs x @ W + x @ A @ B), grows to whole logits within ten steps and no two implementations
    generate alike. At 0.05 it is not, like a trained model."""
    from finetune.tiny import generation_config

    path = tmp_path_factory.mktemp("base") / "tiny-base"
    model = make_model(tokenizer, canvas_length=CANVAS, init=0.05)
    model.generation_config = generation_config(tokenizer, CANVAS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_run(path, tokenizer, base_dir, placement="shared", seed=0, equal_separate=False):
    """A run directory as python -m finetune leaves it, with random (non-zero) LoRA weights."""
    from finetune.config import compose

    overrides = [f"lora.placement={placement}", "lora.r=4", "lora.alpha=8", f"model.name_or_path={base_dir}"]
    if placement == "decoder":
        overrides.append("objective.encoder_ar_weight=0")
    cfg = compose(overrides)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir)
    peft_model = attach_lora(model, LoraSettings(**cfg.lora)).eval()
    randomise_lora(peft_model, seed)
    if equal_separate:  # separately trained matrices that happen to agree: mergeable into the tied layout
        copy_decoder_lora_to_encoder(peft_model)
    os.makedirs(path)
    OmegaConf.save(cfg, os.path.join(path, "config.yaml"))
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump({**METRICS, "base_model": base_dir}, f)
    save_adapter(peft_model, tokenizer, os.path.join(path, "adapter"))
    return str(path), peft_model


def tree(path):
    """Every file under path with its bytes: to prove a failed export changed nothing."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tokenizer, base_dir):
    """A shared-placement run exported as adapter + float32 merged in small shards, both verified."""
    run_dir, model = make_run(tmp_path_factory.mktemp("shared") / "run", tokenizer, base_dir)
    settings = ex.ExportSettings(format="both", dtype="float32", max_shard_size="200KB")
    result = ex.export_run(run_dir, settings, command="python -m finetune.export run_dir=RUN format=both")
    return run_dir, model, result


# --- adapter -----------------------------------------------------------------------------------------------------
def test_adapter_export_is_a_stock_peft_adapter_that_reloads_identically(shared_run, base_dir):
    run_dir, model, result = shared_run
    out = os.path.join(run_dir, "export", "adapter")
    assert result["adapter"]["path"] == out
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name
    # the built-in check reloaded it in a fresh process with stock peft
    assert result["adapter"]["verification"]["max_abs_diff"] <= 1e-5
    assert result["adapter"]["verification"]["adapter_effect"] > 0.1
    # and so does this process: stock PeftModel on a stock base, no re-tying
    ids, canvas = inputs()
    reloaded = PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(logits(reloaded, ids, canvas), logits(model, ids, canvas), atol=1e-5, rtol=0)


# --- merged ------------------------------------------------------------------------------------------------------
def test_merged_checkpoint_has_the_released_layout_in_atomic_shards(shared_run, base_dir, tmp_path):
    run_dir, _, result = shared_run
    out = result["merged"]["path"]
    assert out == os.path.join(run_dir, "export", "merged")
    files = os.listdir(out)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 3 and not [f for f in files if ".partial" in f or ".tmp" in f]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert sorted(set(index["weight_map"].values())) == shards
    keys = set()
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            keys |= set(f.keys())
            assert all(f.get_tensor(k).dtype in (torch.float32, torch.int64) for k in f.keys())
    assert keys == set(index["weight_map"])
    # exactly the keys transformers writes for a plain model, i.e. the released checkpoint's names
    plain = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir)
    plain.save_pretrained(tmp_path / "plain")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())
    assert any(k.startswith("model.decoder.layers.") for k in keys)
    assert any(k.startswith("model.encoder.language_model.") for k in keys)  # the encoder's own buffers
    assert not any(k.startswith("model.encoder.language_model.layers.") and k.endswith("proj.weight") for k in keys)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    for name in ("tokenizer.json", "generation_config.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_merged_generation_config_holds_the_longest_answer_the_run_trained(shared_run, base_dir):
    """A server reads its default answer length from generation_config.json (vLLM's --generation-config auto): the
    base's one-canvas limit would cut every longer answer the adapter learnt. The rest of the base's settings stay."""
    run_dir, _, result = shared_run
    canvases = OmegaConf.load(os.path.join(run_dir, "config.yaml")).data.max_response_canvases
    base = json.load(open(os.path.join(base_dir, "generation_config.json")))
    merged = json.load(open(os.path.join(result["merged"]["path"], "generation_config.json")))
    assert base["max_new_tokens"] < canvases * CANVAS == merged["max_new_tokens"]
    assert {k: v for k, v in merged.items() if k not in ("max_new_tokens", "transformers_version")} == \
        {k: v for k, v in base.items() if k not in ("max_new_tokens", "transformers_version")}


def test_merged_checkpoint_loads_plainly_and_matches_the_adapter_model(shared_run):
    run_dir, model, result = shared_run
    assert result["merged"]["verification"]["max_abs_diff"] <= 1e-4  # fresh-process check, float32
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(result["merged"]["path"]).eval()
    enc = merged.model.encoder.language_model.layers[0].self_attn.q_proj.weight
    assert enc is merged.model.decoder.layers[0].self_attn.q_proj.weight  # still one tied tensor
    ids, canvas = inputs()
    expected = logits(model, ids, canvas)
    got = logits(merged, ids, canvas)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, diff
    with model.disable_adapter():
        assert (logits(model, ids, canvas) - expected).abs().max() > 100 * max(diff, 1e-6)  # not the base


def test_merged_and_adapter_models_generate_the_same_tokens_for_the_same_seed(shared_run):
    run_dir, model, result = shared_run
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(result["merged"]["path"]).eval()
    ids = torch.randint(10, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    for seed in (0, 1):
        outs = []
        for m in (model.get_base_model(), merged):
            torch.manual_seed(seed)
            with torch.no_grad():  # 12 denoising steps (of 48) per canvas keep it fast; self-conditioning included
                outs.append(m.generate(input_ids=ids, max_new_tokens=2 * CANVAS, max_denoising_steps=12).sequences)
        assert outs[0].shape[1] > ids.shape[1]
        assert torch.equal(outs[0], outs[1]), seed


# vLLM's DiffusionGemma (vllm/model_executor/models/diffusion_gemma.py, hf_to_vllm_mapper) runs one backbone for
# both passes: it renames checkpoint keys by these prefixes, first match wins.
VLLM_PREFIXES = {
    "model.decoder.self_conditioning.": "self_conditioning.",
    "model.decoder.": "model.",
    "model.encoder.language_model.": "model.",
    "model.encoder.vision_tower.": "vision_tower.",
    "model.encoder.embed_vision.": "embed_vision.",
}


def vllm_collisions(directory):
    """Checkpoint keys that vLLM's renaming lands on one parameter with different values."""
    from safetensors.torch import load_file

    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    seen, clashes = {}, []
    for key, value in tensors.items():
        new = next((v + key[len(p):] for p, v in VLLM_PREFIXES.items() if key.startswith(p)), key)
        if new in seen and not torch.equal(seen[new][1], value):
            clashes.append((seen[new][0], key))
        seen.setdefault(new, (key, value))
    return clashes


def test_merged_checkpoint_gives_vllms_single_backbone_one_consistent_set_of_weights(shared_run):
    _, _, result = shared_run
    assert vllm_collisions(result["merged"]["path"]) == []


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tokenizer, base_dir):
    return make_run(tmp_path_factory.mktemp("bf16") / "run", tokenizer, base_dir)


def test_bfloat16_merge_passes_its_check_and_is_written_in_bfloat16(bf16_run):
    run_dir, _ = bf16_run
    result = ex.export_run(run_dir, ex.ExportSettings(format="merged"))  # dtype bfloat16 is the default
    v = result["merged"]["verification"]
    print(f"bf16 merged: max |logit diff| {v['max_abs_diff']:.4f}, bf16 cast alone {v['cast_cost']:.4f}, "
          f"adapter effect {v['adapter_effect']:.4f}")
    assert v["precision"] == "bfloat16" and v["max_abs_diff"] <= v["tolerance"]
    with safe_open(os.path.join(result["merged"]["path"], "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.decoder.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    assert json.load(open(os.path.join(result["merged"]["path"], "config.json")))["dtype"] == "bfloat16"


def test_float32_export_of_a_bfloat16_model_is_judged_with_the_precision_it_measured(bf16_run, tmp_path):
    """A bf16 fine-tuned model exported in float32 (the rehearsal's export at real width: bf16 against float32
    logits differed by 1.37 there, over bf16's TOLERANCE alone): the reload process measures what computing the
    reloaded weights in bf16 costs, and the check allows 1.5x that, as it does the other way round."""
    run_dir, model = bf16_run
    model = copy.deepcopy(model).to(torch.bfloat16)
    result = ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", out=str(tmp_path / "m")),
                           model=model, tokenizer=AutoTokenizer.from_pretrained(os.path.join(run_dir, "adapter")))
    v = result["merged"]["verification"]
    print(v)
    assert v["precision"] == "bfloat16" and v["cast_cost"] > 0
    assert v["tolerance"] == max(verify.TOLERANCE["bfloat16"], 1.5 * v["cast_cost"])
    assert v["max_abs_diff"] <= v["tolerance"]
    card = open(os.path.join(result["merged"]["path"], "README.md")).read()
    assert "Computing these float32 weights in bfloat16 (the fine-tuned model's precision) alone moves" in card


@pytest.mark.parametrize("factor", [0.0, 2.0], ids=["zeroed-delta", "doubled-delta"])
def test_bfloat16_check_catches_a_lost_or_doubled_delta(bf16_run, monkeypatch, tmp_path, factor):
    """bf16 rounding earns the check a wide tolerance; it must still see a merge that writes no delta, or twice it.
    The absolute bound is lifted out of the way here: the rule that does not depend on it (the export keeps the
    adapter's effect) must catch both, so they fail at any bf16 tolerance, 1.0 included."""
    run_dir, _ = bf16_run
    real = merge.delta_of
    monkeypatch.setattr(merge, "delta_of", lambda module: factor * real(module))
    monkeypatch.setitem(verify.TOLERANCE, "bfloat16", 100.0)
    out = tmp_path / "merged"
    with pytest.raises(UserError, match="of the adapter's own effect .* the delta is partly lost or misplaced") as e:
        ex.export_run(run_dir, ex.ExportSettings(format="merged", out=str(out)))
    print(e.value)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith("merged")]


def test_the_check_lets_one_position_in_ten_flip_a_router_near_tie_and_no_more():
    """A merged tensor rounds W + delta where the model rounds W: a token at a near-tie in a router's top-k may take
    another expert, which moves that one position. The check lets one position in ten do so, as long as it stays
    closer to the fine-tuned model than the base is there; two in sixteen, or one that is as far as the base, fail."""
    g = torch.Generator().manual_seed(0)
    finetuned = {"logits_0": torch.randn(2, 8, 50, generator=g)}
    base = {"logits_0": finetuned["logits_0"] + 4.0}  # the adapter's effect: 4 at every position
    reference = {"finetuned": finetuned, "base": base}

    def reloaded(*moves):
        got = finetuned["logits_0"] + 0.05 * torch.randn(2, 8, 50, generator=g)  # rounding's size
        for (i, j), by in moves:
            got[i, j, 3] += by
        return {"logits_0": got}

    result = verify.check("merged", reloaded(((1, 4), 2.0)), reference, "bfloat16", "test")
    assert result["positions"] == 16 and result["positions_over_tolerance"] == 1 and result["max_abs_diff"] > 1.5
    assert result["typical_abs_diff"] < 0.5
    with pytest.raises(UserError, match="at 2 of 16 positions"):
        verify.check("merged", reloaded(((1, 4), 2.0), ((0, 2), 2.0)), reference, "bfloat16", "test")
    with pytest.raises(UserError, match="at 1 of 16 positions"):
        verify.check("merged", reloaded(((1, 4), 4.5)), reference, "bfloat16", "test")  # as far as the base


# --- the encoder/decoder tie -------------------------------------------------------------------------------------
def test_decoder_only_adapter_is_refused_with_an_explanation_and_nothing_written(tmp_path, tokenizer, base_dir):
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir, placement="decoder")
    before = tree(run_dir)
    with pytest.raises(UserError) as e:
        ex.export_run(run_dir, ex.ExportSettings(format="both", dtype="float32"))
    msg = str(e.value)
    assert "cannot merge into the tied layout" in msg and "decoder-only LoRA leaves the encoder" in msg
    assert "model.encoder.language_model.layers." in msg  # which modules differ
    assert "lora.placement=shared" in msg and "untie=true" in msg
    assert tree(run_dir) == before  # refused before anything was written, the adapter export included


def test_untie_writes_an_untied_checkpoint_that_matches_and_says_so(tmp_path, tokenizer, base_dir):
    run_dir, model = make_run(tmp_path / "run", tokenizer, base_dir, placement="decoder")
    result = ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", untie=True))
    out = result["merged"]["path"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is False
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        enc = f.get_tensor("model.encoder.language_model.layers.0.self_attn.q_proj.weight")
        dec = f.get_tensor("model.decoder.layers.0.self_attn.q_proj.weight")
    assert "lm_head.weight" in keys and "model.encoder.language_model.embed_tokens.weight" in keys
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir)
    torch.testing.assert_close(enc, base.model.encoder.language_model.layers[0].self_attn.q_proj.weight)  # base
    assert not torch.allclose(dec, enc)  # the decoder got the delta
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    assert merged.model.encoder.language_model.layers[0].self_attn.q_proj.weight is not \
        merged.model.decoder.layers[0].self_attn.q_proj.weight
    ids, canvas = inputs()
    assert (logits(merged, ids, canvas) - logits(model, ids, canvas)).abs().max() <= 1e-4
    card = open(os.path.join(out, "README.md")).read()
    assert "UNTIED" in card and "vLLM cannot serve it" in card and "vllm serve" not in card
    clashes = vllm_collisions(out)  # why: vLLM would load encoder and decoder weights into the same tensors
    assert ("model.decoder.layers.0.self_attn.q_proj.weight",
            "model.encoder.language_model.layers.0.self_attn.q_proj.weight") in {tuple(sorted(c)) for c in clashes}


def test_separate_adapters_merge_only_when_their_deltas_agree(tmp_path, tokenizer, base_dir):
    run_dir, model = make_run(tmp_path / "equal", tokenizer, base_dir, placement="separate", equal_separate=True)
    result = ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32"))
    assert result["merged"]["verification"]["max_abs_diff"] <= 1e-4  # the fresh-process check ran and passed
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(result["merged"]["path"]).eval()
    assert merged.config.tie_word_embeddings is True
    ids, canvas = inputs()
    expected = logits(model, ids, canvas)
    assert (logits(merged, ids, canvas) - expected).abs().max() <= 1e-4
    with model.disable_adapter():
        assert (logits(model, ids, canvas) - expected).abs().max() > 0.1  # the adapter did something to match
    run_dir, _ = make_run(tmp_path / "differ", tokenizer, base_dir, placement="separate")
    with pytest.raises(UserError, match="different deltas on .* tensors .* the deltas differ"):
        ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", verify=False))
    assert not os.path.exists(os.path.join(run_dir, "export"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_leaky_merge_fails_verification_and_leaves_nothing(tmp_path, tokenizer, base_dir, monkeypatch, dtype):
    """What peft's merge_and_unload does to a decoder-only adapter (the delta lands in the shared tensor, so the
    encoder gets it too) is caught by the built-in check, and the export is not written."""
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir, placement="decoder")
    real = merge.merge_plan

    def leaky(model, untie=False):
        plan = real(model, untie=True)  # every delta, then folded into the tied layout regardless
        tied = model.get_base_model().all_tied_weights_keys
        tensors = {k: t for k, t in plan.tensors.items() if k not in tied}
        return merge.MergePlan(tensors, {k: m for k, m in plan.lora.items() if k in tensors}, False, "leaky")

    monkeypatch.setattr(merge, "merge_plan", leaky)
    with pytest.raises(UserError, match="merged export failed verification") as e:
        ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype=dtype))
    print(e.value)
    assert not os.path.exists(os.path.join(run_dir, "export"))


# --- crashes and overwrites --------------------------------------------------------------------------------------
def test_a_crash_mid_write_leaves_no_export_and_the_prior_state_untouched(tmp_path, tokenizer, base_dir,
                                                                          monkeypatch):
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir)
    ex.export_run(run_dir, ex.ExportSettings(format="adapter", verify=False))  # an earlier, complete export
    before = tree(run_dir)
    real, written = staging.write_shard, []

    def crash_after_first(tensors, path):
        if written:
            raise OSError("simulated crash: disk full")
        real(tensors, path)
        written.append(path)

    monkeypatch.setattr(staging, "write_shard", crash_after_first)
    with pytest.raises(OSError, match="simulated crash"):
        ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", max_shard_size="200KB"))
    assert written  # it did crash mid-write, after a whole shard
    assert not os.path.exists(os.path.join(run_dir, "export", "merged"))
    assert tree(run_dir) == before  # no temporary directory left, adapter and earlier export byte-identical


def test_a_killed_export_leaves_only_an_incomplete_temporary_and_a_rerun_succeeds(tmp_path, tokenizer, base_dir):
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir)
    code = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
from finetune import export as ex
from finetune.export import staging
real = staging.write_shard
def die(tensors, path):
    real(tensors, path)
    os._exit(9)  # killed after the first shard: no cleanup runs
staging.write_shard = die
ex.export_run({run_dir!r}, ex.ExportSettings(format="merged", dtype="float32", max_shard_size="200KB"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr[-2000:]
    export_dir = os.path.join(run_dir, "export")
    assert not os.path.exists(os.path.join(export_dir, "merged"))
    leftovers = os.listdir(export_dir)
    assert len(leftovers) == 1 and leftovers[0].startswith("merged.tmp-")
    left = os.listdir(os.path.join(export_dir, leftovers[0]))
    assert "config.json" not in left and "model.safetensors.index.json" not in left  # cannot pass for a model
    ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", max_shard_size="200KB",
                                             verify=False))
    assert os.path.isfile(os.path.join(export_dir, "merged", "config.json"))


def test_an_existing_export_is_never_overwritten(shared_run):
    run_dir, _, _ = shared_run
    before = tree(os.path.join(run_dir, "export"))
    with pytest.raises(UserError, match="already exists: export never overwrites"):
        ex.export_run(run_dir, ex.ExportSettings(format="merged"))
    assert tree(os.path.join(run_dir, "export")) == before


# --- model card --------------------------------------------------------------------------------------------------
def test_model_cards_carry_metadata_recipe_eval_command_and_serving(shared_run, base_dir):
    run_dir, _, result = shared_run
    for fmt, library in (("adapter", "peft"), ("merged", "transformers")):
        path = result[fmt]["path"]
        card = open(os.path.join(path, "README.md")).read()
        front = yaml.safe_load(card.split("---\n")[1])
        assert front["library_name"] == library and front["base_model"]
        assert {"diffusiongemma", "lora", "block-diffusion"} <= set(front["tags"])
        for section in ("## Base model", "## Recipe", "## Data", "## LoRA settings", "## Evaluation",
                        "## Export verification", "## How it was made", "## Use it"):
            assert section in card, (fmt, section)
        assert base_dir in card and "r 4, alpha 8" in card and "placement `shared`" in card
        assert "| generation exact match | 0.0% | 100.0% |" in card and "0.0119" in card
        assert "python -m finetune.export run_dir=RUN format=both" in card
        assert ex.usage_snippet(fmt, path, base_dir, "float32" if fmt == "merged" else "bfloat16") in card
    merged_card = open(os.path.join(result["merged"]["path"], "README.md")).read()
    assert ex.vllm_command(result["merged"]["path"], CANVAS) in merged_card
    assert "--diffusion-config '{\"canvas_length\":8}'" in merged_card
    assert "identical LoRA deltas" in merged_card


def test_the_usage_snippets_run(shared_run, base_dir):
    """The model card's Python, as printed (CPU, float32), loads the exports and generates."""
    _, _, result = shared_run
    for fmt in ("adapter", "merged"):
        code = ex.usage_snippet(fmt, result[fmt]["path"], base_dir, "float32", max_new_tokens=2 * CANVAS)
        namespace = {}
        exec(compile(code, f"<{fmt} snippet>", "exec"), namespace)
        prompt, sequences = namespace["ids"], namespace["out"].sequences
        assert torch.equal(sequences[:, : prompt.shape[1]], prompt)
        assert sequences.shape[1] >= prompt.shape[1] + CANVAS, fmt  # at least one generated canvas


# --- command line and docs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args,expected",
    [
        ([], "run_dir=PATH or adapter=DIR is required"),
        (["format=merged"], "run_dir=PATH or adapter=DIR is required"),
        (["run_dir=x", "adapter=y"], "run_dir= and adapter= are both given"),
        (["run_dir=x", "fromat=merged"], "unknown key 'fromat'"),
        (["run_dir=x", "format=gguf"], "format='gguf': use one of adapter, merged, both"),
        (["run_dir=x", "dtype=int8"], "dtype='int8': use one of bfloat16, float32, float16"),
        (["run_dir=x", "verify=maybe"], "verify: Value 'maybe' is not a valid bool"),
        (["run_dir=x", "untie=[1]"], "untie: "),
        (["run_dir=x", "push_to_hub=nohub"], "push_to_hub='nohub'"),
        (["run_dir=x", "max_shard_size=big"], "max_shard_size='big'"),
        (["run_dir"], "is not key=value"),
        (["run_dir=/no/such/run"], "run_dir=/no/such/run is not a finished run"),
        (["adapter=/no/such/adapter"], "adapter='/no/such/adapter' does not exist"),
        (["run_dir=x", "--cfg", "hydra"], "no Hydra settings: use --cfg job"),
        (["run_dir=x", "--cfg", "jobs"], "--cfg takes job, hydra, all"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, expected, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_help_prints_the_usage_and_loads_nothing(capsys):
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m finetune.export run_dir=PATH | adapter=DIR")
    for key in list(ex.ExportSettings.__dataclass_fields__) + ["run_dir", "adapter"]:
        assert f"  {key}=" in out, key  # every key the schema has is explained


def test_cfg_job_prints_the_resolved_settings_and_where_they_go_without_loading(capsys, tmp_path):
    adapter = tmp_path / "not-even-there"  # nothing is read: a path that does not exist yet is fine
    assert cli.main([f"adapter={adapter}", "format=both", "dtype=float32", "untie=true", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown == {**OmegaConf.to_container(OmegaConf.structured(ex.ExportSettings)),
                     "format": "both", "dtype": "float32", "untie": True}
    assert f"# writes merged: {adapter}-export/merged" in out and f"# adapter: {adapter}" in out
    assert not os.path.exists(f"{adapter}-export")


def test_cli_in_a_fresh_process_exports_and_refuses_cleanly(tmp_path, tokenizer, base_dir):
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir, placement="decoder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "finetune.export", f"run_dir={run_dir}", "format=merged", "dtype=float32"]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: cannot merge into the tied layout"), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    out = tmp_path / "elsewhere"
    args = ["untie=true", f"out={out}", "verify=false"]  # the untie test verifies; here the command line counts
    done = subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"export: merged -> {out}" in done.stdout
    card = open(out / "README.md").read()
    assert f"python -m finetune.export run_dir={run_dir} format=merged dtype=float32 {' '.join(args)}" in card


def test_end_of_run_config_group_is_documented_and_validated():
    from finetune.config import compose

    cfg = compose([])
    assert cfg.export.format == "adapter" and cfg.export.push_to_hub is None
    settings = ex.ExportSettings(**OmegaConf.to_container(cfg.export)).validate(allow_none=True)
    assert settings.verify and not settings.untie and settings.dtype == "bfloat16"
    text = open(os.path.join(ROOT, "finetune", "config.py")).read().split("class ExportSettings:", 1)[1]
    for key in cfg.export:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
        assert "  # " in line, key  # every key has its one-line comment where its default is
    assert compose(["export.format=both", "export.untie=true"]).export.format == "both"


def test_end_of_run_export_uses_the_model_in_memory_and_keeps_a_refused_run_intact(tmp_path, tokenizer, base_dir):
    """What finetune/run.py calls after training: export_at_end_of_run(run_dir, cfg, peft_model, tokenizer, device)."""
    from finetune.config import compose

    run_dir, model = make_run(tmp_path / "run", tokenizer, base_dir, placement="decoder")
    base = ["lora.placement=decoder", "objective.encoder_ar_weight=0"]
    assert ex.export_at_end_of_run(run_dir, compose(base + ["export.format=none"]), model, tokenizer, "cpu") is None
    with pytest.raises(UserError, match=r"cannot merge .* \(the run itself is complete: .* python -m finetune.export "
                                        f"run_dir={run_dir}"):
        ex.export_at_end_of_run(run_dir, compose(base + ["export.format=merged"]), model, tokenizer, "cpu")
    result = ex.export_at_end_of_run(run_dir, compose(base + ["export.format=adapter"]), model, tokenizer, "cpu")
    assert result["adapter"]["path"] == os.path.join(run_dir, "export", "adapter")
    assert result["adapter"]["verification"]["max_abs_diff"] <= 1e-5
    assert result["adapter"]["verification"]["adapter_effect"] > 0.1


def documented_export_commands():
    import glob

    from test_docs import code_blocks

    found = []
    for path in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "playbooks", "*", "README.md")):
        for block in code_blocks(open(path).read()):
            for line in block.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith("python -m finetune.export"):
                    found.append((os.path.relpath(path, ROOT), line))
    return found


def test_docs_show_export_commands():
    where = {w for w, _ in documented_export_commands()}
    assert {"README.md", "playbooks/dgx-spark/README.md", "playbooks/rtx-workstation/README.md"} <= where


@pytest.mark.parametrize("where,command", documented_export_commands())
def test_documented_export_commands_pass_the_cli_checks(where, command, capsys):
    import shlex

    args = shlex.split(command)[3:]
    assert cli.main(args + ["--cfg", "job"]) == 0, (where, command, capsys.readouterr().err)
    run_dir, adapter, settings = cli.parse(args)
    assert (run_dir or adapter) and settings.format in ex.FORMATS, (where, command)


def test_readme_states_the_tolerances_the_check_uses():
    """README.md's numbers for the export check are the code's (they once said 0.5 where the code used 1.0)."""
    import re

    text = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    found = re.search(r"float32: ([0-9.e-]+); bfloat16: ([0-9.]+) and under (a quarter|a half|a third) of the "
                      r"adapter's own effect", text)
    assert found, "README.md no longer states the export tolerances in the expected words"
    assert float(found.group(1)) == verify.TOLERANCE["float32"]
    assert float(found.group(2)) == verify.TOLERANCE["bfloat16"]
    assert {"a quarter": 0.25, "a half": 0.5, "a third": 1 / 3}[found.group(3)] == verify.MAX_EFFECT_LOST


def test_playbooks_serve_exactly_what_export_writes():
    """The playbook's serving instructions are the model card's, for the paths export writes by default."""
    spark = open(os.path.join(ROOT, "playbooks", "dgx-spark", "README.md")).read()
    run = "outputs/chat_spark-<time>"
    assert ex.export_command(run, "merged") in spark
    assert ex.vllm_command(f"{run}/export/merged", 256) in spark
    assert ex.usage_snippet("merged", f"{run}/export/merged", "google/diffusiongemma-26B-A4B-it") in spark
    assert ex.usage_snippet("adapter", f"{run}/export/adapter", "google/diffusiongemma-26B-A4B-it") in spark
    rtx = open(os.path.join(ROOT, "playbooks", "rtx-workstation", "README.md")).read()
    assert ex.export_command("outputs/chat_rtx-<time>", "merged") in rtx
    assert ex.vllm_command("outputs/chat_rtx-<time>/export/merged", 256) in rtx
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "python -m finetune.export" in readme and "vllm serve" in readme


# --- adapters saved elsewhere (stock peft, as TRL, axolotl or Unsloth leave them) -------------------------------
LAYERS = r"\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
STOCK_TARGETS = {"shared": r"model\.(encoder\.language_model|decoder)" + LAYERS,
                 "separate": r"model\.(encoder\.language_model|decoder)" + LAYERS,
                 "decoder": r"model\.decoder" + LAYERS}


@pytest.fixture(scope="module")
def stock_adapters(tmp_path_factory, base_dir):
    """One adapter per placement, saved by stock peft (no tying, no tokenizer, no run directory), with random
    non-zero A and B: ``shared`` has the decoder's values copied into the encoder, ``separate`` differs, ``decoder``
    adapts the decoder only. Returns {placement: (adapter dir, its logits through stock PeftModel.from_pretrained)}."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("stock")
    ids, canvas = inputs()
    found = {}
    for seed, (placement, regex) in enumerate(STOCK_TARGETS.items()):
        model = get_peft_model(DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=regex)).eval()
        randomise_lora(model, seed)
        if placement == "shared":
            copy_decoder_lora_to_encoder(model)
        path = root / placement
        model.save_pretrained(path)
        reloaded = PeftModel.from_pretrained(DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir), path).eval()
        found[placement] = (str(path), logits(reloaded, ids, canvas))
    assert sorted(os.listdir(found["shared"][0])) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    return found


def test_stock_adapters_have_the_placements_they_claim(stock_adapters):
    from finetune.model import adapter_placement

    for placement, (path, _) in stock_adapters.items():
        assert adapter_placement(path) == placement


def test_a_stock_shared_adapter_exports_from_the_command_line_and_reloads_to_its_logits(stock_adapters, base_dir):
    path, expected = stock_adapters["shared"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "finetune.export", f"adapter={path}", "format=both", "dtype=float32"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = path + "-export"  # beside the adapter, which stays as it was
    assert sorted(os.listdir(out)) == ["adapter", "merged"]
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    ids, canvas = inputs()
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(os.path.join(out, "merged")).eval()
    assert merged.config.tie_word_embeddings is True  # the released layout: one delta per shared tensor
    assert (logits(merged, ids, canvas) - expected).abs().max() <= 1e-4
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir).eval()
    assert (logits(base, ids, canvas) - expected).abs().max() > 0.1  # the adapter changes what it must keep
    adapter = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    assert (logits(adapter, ids, canvas) - expected).abs().max() <= 1e-5
    assert os.path.isfile(os.path.join(out, "adapter", "tokenizer.json"))  # the card's snippet loads it from there
    card = open(os.path.join(out, "merged", "README.md")).read()
    assert "## Source" in card and "not recorded here" in card and "Placement read from its weights: `shared`" in card
    assert "## Recipe" not in card and "## Data" not in card and "| generation exact match" not in card
    assert f"python -m finetune.export adapter={path} format=both dtype=float32" in card
    assert f"export: merged -> {out}/merged" in done.stdout


@pytest.mark.parametrize("placement,why", [("separate", "the deltas differ"),
                                           ("decoder", "decoder-only LoRA leaves the encoder on the base weights")])
def test_stock_adapters_that_cannot_be_tied_are_refused_with_the_reason(stock_adapters, placement, why, capsys):
    path, _ = stock_adapters[placement]
    before = tree(os.path.dirname(path))
    assert cli.main([f"adapter={path}", "format=merged", "dtype=float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot merge into the tied layout"), err
    assert why in err[0] and "untie=true" in err[0]
    assert tree(os.path.dirname(path)) == before  # nothing written: no <adapter>-export beside it


def test_a_stock_decoder_only_adapter_exports_untied_on_request(stock_adapters, tmp_path, capsys):
    path, expected = stock_adapters["decoder"]
    out = tmp_path / "untied"
    assert cli.main([f"adapter={path}", "format=merged", "dtype=float32", "untie=true", f"out={out}"]) == 0, \
        capsys.readouterr().err
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    assert merged.config.tie_word_embeddings is False
    ids, canvas = inputs()
    assert (logits(merged, ids, canvas) - expected).abs().max() <= 1e-4
    assert "UNTIED" in open(out / "README.md").read()
