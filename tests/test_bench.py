"""bench/train_step.py: the model-FLOPs count on the real architecture (meta device) and a one-step run of the tiny
case."""

import importlib.util
import json
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step", os.path.join(ROOT, "bench", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)  # also puts bench/ on sys.path (make_26b_config)
    return module


def test_flops_of_the_real_architecture_at_chat_spark(bench):
    """3.8B active parameters per token (the published "A4B"), and the step's FLOPs against a hand count."""
    from make_26b_config import OUT
    from transformers import DiffusionGemmaConfig

    from finetune.config import ObjectiveConfig

    config = DiffusionGemmaConfig.from_pretrained(OUT)
    model = bench.lora_model(config, "meta", torch.bfloat16)
    text, c = config.text_config, config.canvas_length
    batch, tokens = bench.make_batch(2048, 4 * c - 1, 1, c, text.vocab_size, 3, 1, 0)
    objective = ObjectiveConfig()
    work = bench.Workload("spark", batch, bench.fixed_noise(batch, c, text.vocab_size, 1e-3), tokens, c, "cpu")
    flops = bench.model_flops(model, work, objective)
    h, v = text.hidden_size, text.vocab_size
    per_layer = {  # q, k, (v,) o + dense MLP + router + 8 of 128 experts
        "sliding_attention": h * (16 * 256 + 2 * 8 * 256) + 16 * 256 * h,
        "full_attention": h * (16 * 512 + 2 * 512) + 16 * 512 * h,
    }
    moe = 3 * h * 2112 + h * 128 + 8 * 3 * 704 * h
    n = sum(per_layer[t] + moe for t in text.layer_types)
    assert flops["active_params_per_token"] == n + h * v
    assert 3.7e9 < flops["active_params_per_token"] < 3.9e9
    adapted = ([(h, 4096), (h, 2048), (h, 2048), (4096, h)] * 25 + [(h, 8192), (h, 1024), (8192, h)] * 5
               + [(h, 2112), (h, 2112), (2112, h)] * 30)
    assert flops["lora_params_per_token"] == sum(16 * (i + o) for i, o in adapted)
    t_enc, sc = 2048 + 4 * c, 3 * h * text.intermediate_size
    weights = 4 * n * t_enc + 4 * (n + sc) * c + 2 * (n + sc) * c  # encoder and decoder with grad, the SC pass
    head = 2 * h * v * (2 * c + 2 * (4 * c) + 2 * c)  # canvas CE, encoder CE (fwd + bwd), SC logits + embeddings
    # the rest: attention (~11% here) and LoRA (~1%)
    assert 1.05 * (weights + head) < flops["model_flops"] < 1.2 * (weights + head)


def test_flops_do_not_depend_on_how_the_weights_are_stored(bench):
    """4-bit experts are buffers and Linear4bit packs two values a byte: counted from storage, the 4-bit steps of the
    first H200 run lost every expert from their model FLOPs (MFU understated ~1.6x)."""
    from finetune.config import ObjectiveConfig
    from finetune.tiny import SPECIALS, build_config, build_tokenizer

    tok = build_tokenizer()
    config = build_config(tok)
    c = config.canvas_length
    batch, tokens = bench.make_batch(16, 3 * c - 1, 2, c, len(tok), len(SPECIALS), tok.eos_token_id, tok.pad_token_id)
    objective = ObjectiveConfig()
    work = bench.Workload("tiny", batch, bench.fixed_noise(batch, c, len(tok), objective.t_min), tokens, c, "cpu")
    counts = {q: bench.model_flops(bench.lora_model(config, "cpu", torch.float32, quantization=q), work, objective)
              for q in ("none", "experts4bit", "all4bit")}
    assert counts["experts4bit"] == counts["none"] == counts["all4bit"]


def test_plan_comparison_runs_on_the_shipped_config(bench, capsys):
    """compare_with_plan composes with a temporary local config dir: the schema's default model.revision must not
    reach it (it did, and every slice/full run crashed there after its first table)."""
    from make_26b_config import OUT, slice_config
    from transformers import DiffusionGemmaConfig

    config = slice_config(DiffusionGemmaConfig.from_pretrained(OUT), 2)
    rows = [{"variant": "lean eager", "total_gb": 8.0}, {"variant": "stock eager", "total_gb": 9.0}]
    bench.compare_with_plan(config, "chat_spark", False, rows)
    assert 5 < rows[0]["plan_gb"] < 15 and "plan_gb" not in rows[1]
    assert "plan vs measured, lean eager" in capsys.readouterr().out


def held_for_backward(bench, model, work, variant) -> int:
    """A lower bound on the memory a step must add (bytes): the whole pages of what autograd keeps for backward, all
    alive at once when forward ends (the weights and the batch, there before the step, aside). A storage of n bytes
    spans at least n // page - 1 whole pages wherever it lies, and a whole free page is out of the process after the
    bench's malloc_trim, so touching it grows RSS; except the LoRA gradients' pages, freed after the trim (one_step
    drops them just before its baseline), which the step may reuse."""
    bench.set_experts(model, variant.experts)
    there = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *work.batch.values(),
                                                      *work.noise.values()]}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bench.diffusion_loss(model.get_base_model(), work.batch, variant.objective, work.canvas_length,
                             lean=variant.lean, **work.noise)
    page = os.sysconf("SC_PAGE_SIZE")
    pages = sum(max(0, n // page - 1) * page for ptr, n in saved.items() if ptr not in there)
    return pages - sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_tiny_case_runs_and_both_paths_agree(bench, tmp_path, one_thread, monkeypatch):
    bounds, measure = {}, bench.measure

    def bounded(model, work, variants, *args):  # the bound of each variant, from the model and batch the bench built
        bounds.update({v.name: held_for_backward(bench, model, work, v) for v in variants})
        return measure(model, work, variants, *args)

    monkeypatch.setattr(bench, "measure", bounded)
    out = tmp_path / "tiny.json"
    assert bench.main(["--case", "tiny", "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    stock, lean = rows["stock eager"], rows["lean eager"]
    assert stock["loss"] == pytest.approx(lean["loss"], rel=1e-5)  # same batch, same noise
    for name, row in (("stock eager", stock), ("lean eager", lean)):
        assert row["seconds"] > 0 and row["tokens"] == 4 * (32 + 23)
        # the peak covers at least what the step had to hold at once (several MB here)
        assert bounds[name] > 2**20 and row["peak_gb"] * bench.GB >= bounds[name], (name, row["peak_gb"], bounds)


def test_cpu_peak_memory_sees_what_was_freed_before_the_block_ended(bench):
    """A step's temporaries are gone by its end: only the sampling thread sees them. 64 MiB is above glibc's largest
    mmap threshold (32 MiB), so the tensor gets pages of its own and hands them back when freed."""
    size = 64 * 2**20
    with bench.PeakMemory("cpu") as memory:
        x = torch.ones(size // 4)  # written: every page resident
        time.sleep(0.2)  # as a step works on (the sampler reads every ~1 ms)
        del x
    assert memory.peak >= size


def ablation_module():
    spec = importlib.util.spec_from_file_location("objective_ablation",
                                                  os.path.join(ROOT, "bench", "objective_ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_interval_is_the_95_percent_t_interval_over_seeds():
    ablation = ablation_module()
    assert ablation.interval([0.0, 1.0]) == pytest.approx((0.5, 12.706 * 0.5))  # sd 0.707, n 2: t(1) = 12.706
    assert ablation.interval([0.5, 0.5, 0.5]) == (0.5, 0.0)


@pytest.mark.slow
def test_objective_ablation_quick_scores_every_run_and_writes_the_table_and_plot(default_run, tmp_path):
    """bench/objective_ablation.py --quick, CI's smoke test of the script (not a quality gate): two settings, two
    seeds, each run scored at the short budget and at 4x; the table, the plot, and a second run reuses the results."""
    import subprocess

    command = [sys.executable, "bench/objective_ablation.py", "--quick", "--workers", "1", "--out", str(tmp_path)]
    env = {**default_run[1], "OMP_NUM_THREADS": "1"}  # the cached tiny base of the default run
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ablation_results.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["seed"], r["steps"]) for r in rows) == sorted(
        (s, seed, steps) for s in ("default", "objective=unsloth") for seed in (0, 1) for steps in (4, 16))
    for r in rows:
        assert r["task"] == "reverse" and 0 <= r["exact_match_default"] <= 1 and 0 <= r["exact_match_fast"] <= 1
        assert 0 < r["steps_per_canvas_default"] <= 48 and 0 < r["steps_per_canvas_fast"] <= 8
        assert r["tokens_per_forward_default"] > 0 and 0 < r["heldout_loss"] < 10 and r["train_loss_last10"] > 0
    table = (tmp_path / "ABLATION.md").read_text()
    assert "`python bench/objective_ablation.py --quick" in table
    assert table.count("| default | ") == 5 and table.count("| objective=unsloth | ") == 5  # one row per metric
    assert "No sweep: one lr for every setting, 0.002." in table  # --quick runs one lr: no sweep table
    assert (tmp_path / "ablation.png").stat().st_size > 10_000
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "4 runs, 4 already in" in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_rehearsal_drives_every_entry_point_and_ends_with_its_line(tokenizer, tmp_path):
    """bench/rehearsal.py on a tiny bf16 checkpoint (the real-width run is the bench's own, bench/RESULTS.md): every
    phase exits as it should (the kill mid-run included), the resume is bit for bit, the stock reload of the float32
    export matches base + adapter far below the adapter's effect, the planner probe runs, and the last line has
    the issue's shape."""
    import re
    import subprocess

    from conftest import make_model

    base = tmp_path / "dg"
    make_model(tokenizer).to(torch.bfloat16).save_pretrained(base)  # bf16 on disk, as the released weights
    tokenizer.save_pretrained(base)
    numbers = tmp_path / "rehearsal.json"
    # 20 steps: the kill must land mid-run, and a tiny run of 3 could end between two polls
    result = subprocess.run([sys.executable, "bench/rehearsal.py", "--checkpoint", str(base), "--dir",
                             str(tmp_path / "work"), "--canvases", "8", "--steps", "20", "--probes", "bf16",
                             "--json", str(numbers)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    last = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"rehearsal: plan/measured bf16 \S+ fp32 n/a experts4bit n/a all4bit n/a; resume bitwise: "
                        r"yes; export reload max\|d\| \S+; step s/FLOP-rate \S+", last), result.stdout[-3000:] + \
        result.stderr[-3000:]
    data = json.loads(numbers.read_text())
    codes = {row["phase"]: row["code"] for row in data["phases"]}
    assert codes == {"plan": 0, "preflight": 0, "train": 0, "killed": -9, "resumed": 0, "eval": 0, "export": 0,
                     "reload": 0, "probe:bf16": 0}
    assert all(row["peak_gb"] > 0.1 for row in data["phases"])  # a Python process with torch, measured
    assert data["resume_bitwise"] is True
    reload = data["reload"]
    assert reload["max_diff"] < 1e-3 < reload["effect"], reload
    assert data["step"]["ratio"] > 0 and data["probes"][0]["predicted"] > 0


def test_the_experts_bench_names_the_setting_its_numbers_call_for(bench):
    """bench/experts.py ends with the model.experts_implementation a user should set on their card: auto when what
    auto picks there is within 5% of the fastest, else the faster one (grouped_mm's per-expert fallback on sm_12x)."""
    from experts import recommendation  # bench/ is on sys.path (the bench fixture)

    assert "=auto" in recommendation({"eager": 1.0, "grouped_mm": 1.04}, "cuda")
    assert recommendation({"eager": 1.0, "grouped_mm": 2.0}, "cuda").startswith(
        "use model.experts_implementation=eager: x2.00")
    assert "=auto (it picks eager" in recommendation({"eager": 1.0, "grouped_mm": 0.99}, "cpu")


@pytest.mark.slow
def test_speed_ablation_quick_scores_every_sampler_point_and_writes_the_tables_and_plot(default_run, tmp_path):
    """bench/speed_ablation.py --quick, CI's smoke test of the script (not a quality gate): the default objective and
    objective=fast's penalty, one seed, each adapter at two sampler points; the tables, the plot; a rerun reuses."""
    import subprocess

    command = [sys.executable, "bench/speed_ablation.py", "--quick", "--workers", "1", "--out", str(tmp_path)]
    env = {**default_run[1], "OMP_NUM_THREADS": "1"}  # the cached tiny base of the default run
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "speed_results.jsonl").read_text().splitlines()]
    assert sorted(r["setting"] for r in rows) == ["certainty=0.5 (objective=fast)", "default"]
    for r in rows:
        for point in ("b0.1_s8", "b2_s8"):
            assert 0 <= r[f"exact_match_{point}"] <= 1 and r[f"tokens_per_any_forward_{point}"] > 0
            # the encoder passes count too: fewer tokens per forward than transformers' decoder-only count
            assert r[f"tokens_per_any_forward_{point}"] < r[f"tokens_per_forward_{point}"]
            assert 0 < r[f"steps_per_canvas_{point}"] <= 8
    table = (tmp_path / "SPEED.md").read_text()
    assert "`python bench/speed_ablation.py --quick" in table
    assert "## Area under the score-parallelism frontier" in table
    assert "within the noise of the default's best on" in table
    assert table.count("| default | ") == 3 and table.count("| certainty=0.5 (objective=fast) | ") == 3
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 runs, 2 already in" in again.stdout, again.stderr[-2000:]


def test_speed_verdict_compares_the_fastest_points_within_the_noise_of_the_default_objectives_best():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from speed_ablation import verdict

    # (tokens per forward, mean exact match, 95% half-width) per sampler point
    default = [(1.0, 0.90, 0.02), (2.0, 0.88, 0.02), (4.0, 0.40, 0.1)]
    # the floor is 0.90 - max(0.05, 0.02): the default objective's own fastest point there is 2.0 tokens per forward
    floor, mine, theirs, ratio = verdict(default, [(1.5, 0.95, 0.0), (5.0, 0.86, 0.0), (9.0, 0.5, 0.0)], 0.05)
    assert floor == pytest.approx(0.85) and mine == (2.0, 0.88) and theirs == (5.0, 0.86)
    assert ratio == pytest.approx(2.5)
    # a wide interval widens the floor; a setting that never reaches it has no point and no ratio
    assert verdict([(1.0, 0.9, 0.3), (3.0, 0.61, 0.0)], [(2.0, 0.5, 0.0)], 0.05)[1:] == ((3.0, 0.61), None, None)
    # a task the default objective never learnt is no test: faster wrong answers are not a win
    assert verdict([(1.0, 0.02, 0.0)], [(9.0, 0.0, 0.0)], 0.05)[1:] == (None, None, None)
