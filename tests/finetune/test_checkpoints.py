"""Checkpoints that cannot lie, and the resume decision: sealed, checked, rotated; auto | false | PATH (no model)."""

import os

import pytest
from omegaconf import OmegaConf

from finetune import checkpoints
from finetune.__main__ import in_place
from finetune.errors import UserError

CONFIG = {"seed": 0, "lora": {"r": 4}, "train": {"lr": 0.002, "max_steps": 6, "seed": 0}}


def fake_checkpoint(run, step, config=CONFIG):
    """A sealed checkpoint with the files a resume needs (dummy contents) under <run>/checkpoints."""
    root = run / checkpoints.CHECKPOINTS
    staged = root / checkpoints.STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    for name in (*checkpoints.REQUIRED, "rng_state.pth"):
        (staged / name).write_bytes(os.urandom(64))
    OmegaConf.save(OmegaConf.create(config), staged / checkpoints.CONFIG)
    checkpoints.seal(str(staged), {"step": step})
    final = root / f"checkpoint-{step}"
    checkpoints.commit(str(staged), str(final))
    return final


def test_sealed_checkpoint_verifies_and_each_kind_of_damage_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, 2)
    assert checkpoints.verify(str(path)) is None
    optimizer = path / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[:10])
    assert "truncated" in checkpoints.verify(str(path))
    optimizer.write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit off
    assert "SHA-256" in checkpoints.verify(str(path))
    optimizer.write_bytes(data)
    (path / checkpoints.MANIFEST).unlink()
    assert "no manifest.json" in checkpoints.verify(str(path))


def test_seal_refuses_a_checkpoint_that_could_not_be_resumed(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="lacks adapter_config.json, optimizer.pt, .*rng_state.pth"):
        checkpoints.seal(str(tmp_path), {})
    assert not (tmp_path / checkpoints.MANIFEST).exists()


def test_rotation_keeps_the_newest_complete_and_never_deletes_a_damaged_one(tmp_path):
    for step in (2, 4, 6, 8):
        fake_checkpoint(tmp_path, step)
    damaged = tmp_path / "checkpoints" / "checkpoint-4"
    (damaged / checkpoints.MANIFEST).unlink()
    deleted = checkpoints.rotate(str(tmp_path / "checkpoints"), keep=2)
    assert [os.path.basename(p) for p in deleted] == ["checkpoint-2"]
    left = sorted(os.listdir(tmp_path / "checkpoints"))
    assert left == [".staging", "checkpoint-4", "checkpoint-6", "checkpoint-8"]


def test_commit_keeps_a_damaged_checkpoint_of_the_same_step_beside_the_new_one(tmp_path):
    old = fake_checkpoint(tmp_path, 4)
    (old / checkpoints.MANIFEST).unlink()
    fake_checkpoint(tmp_path, 4)
    names = os.listdir(tmp_path / "checkpoints")
    assert "checkpoint-4" in names and any(n.startswith("checkpoint-4.replaced-") for n in names)
    assert checkpoints.verify(str(tmp_path / "checkpoints" / "checkpoint-4")) is None


def test_auto_starts_fresh_continues_the_newest_complete_and_names_what_it_skipped(tmp_path):
    assert checkpoints.choose("auto", str(tmp_path / "new"), CONFIG)[0].checkpoint is None
    fake_checkpoint(tmp_path, 2)
    newest = fake_checkpoint(tmp_path, 4)
    decision, warnings = checkpoints.choose("auto", str(tmp_path), CONFIG)
    assert decision.checkpoint == str(newest) and not warnings and not decision.set_aside
    (newest / "adapter_model.safetensors").write_bytes(b"truncated")
    decision, warnings = checkpoints.choose("auto", str(tmp_path), CONFIG)
    assert decision.checkpoint.endswith("checkpoint-2")
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0] and "adapter_model.safetensors" in warnings[0]


def test_auto_refuses_a_finished_run_and_a_run_with_no_complete_checkpoint(tmp_path):
    (fake_checkpoint(tmp_path, 2) / checkpoints.MANIFEST).unlink()
    with pytest.raises(UserError, match="none is complete.*resume=false"):
        checkpoints.choose("auto", str(tmp_path), CONFIG)
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UserError, match="holds a finished run .*resume="):
        checkpoints.choose("auto", str(tmp_path), CONFIG)


def test_false_starts_fresh_with_the_old_checkpoints_kept_aside_and_never_over_an_adapter(tmp_path):
    fake_checkpoint(tmp_path, 2)
    decision, warnings = checkpoints.choose(False, str(tmp_path), CONFIG)
    assert decision.checkpoint is None and decision.set_aside == [str(tmp_path / "checkpoints")]
    assert "kept in" in warnings[0]
    checkpoints.set_aside(decision.set_aside)
    kept = [n for n in os.listdir(tmp_path) if n.startswith("checkpoints.old-")]
    assert len(kept) == 1 and (tmp_path / kept[0] / "checkpoint-2" / checkpoints.MANIFEST).is_file()
    (tmp_path / "adapter").mkdir()
    with pytest.raises(UserError, match="already holds an adapter"):
        checkpoints.choose("false", str(tmp_path), CONFIG)


def test_a_named_checkpoint_is_checked_strictly_and_may_branch_into_a_new_directory(tmp_path):
    run = tmp_path / "run"
    good = fake_checkpoint(run, 2)
    bad = fake_checkpoint(run, 4)
    (bad / "optimizer.pt").write_bytes(b"")
    with pytest.raises(UserError, match="not a complete checkpoint: optimizer.pt"):
        checkpoints.choose(str(bad), str(run), CONFIG)
    assert checkpoints.choose(str(run), str(run), CONFIG)[0].checkpoint == str(good)  # a run directory: its newest
    assert checkpoints.choose(str(good), str(tmp_path / "branch"), CONFIG)[0].checkpoint == str(good)
    fake_checkpoint(tmp_path / "other", 2)
    with pytest.raises(UserError, match="already holds a run"):
        checkpoints.choose(str(good), str(tmp_path / "other"), CONFIG)
    with pytest.raises(UserError, match="no such directory"):
        checkpoints.choose(str(tmp_path / "nowhere"), str(run), CONFIG)


def test_continuing_a_finished_run_keeps_its_adapter_aside(tmp_path):
    good = fake_checkpoint(tmp_path, 2)
    (tmp_path / "adapter").mkdir()
    decision, warnings = checkpoints.choose(str(good), str(tmp_path), CONFIG)
    assert decision.set_aside == [str(tmp_path / "adapter")] and "kept as" in warnings[0]


def test_resume_refuses_another_lora_and_lists_a_changed_learning_rate(tmp_path):
    fake_checkpoint(tmp_path, 2)
    with pytest.raises(UserError, match=r"lora.r=4, this run says 8"):
        checkpoints.choose("auto", str(tmp_path), {**CONFIG, "lora": {"r": 8}})
    with pytest.raises(UserError, match=r"train.seed"):  # the sampler's data seed: another order
        checkpoints.choose("auto", str(tmp_path), {**CONFIG, "train": {**CONFIG["train"], "seed": 1}})
    decision, _ = checkpoints.choose("auto", str(tmp_path), {**CONFIG, "train": {**CONFIG["train"], "lr": 0.001},
                                                               "output_dir": "elsewhere", "new_key": 1})
    assert decision.changed == ["train.lr: 0.002 -> 0.001"]  # a key the checkpoint predates is not compared


@pytest.mark.parametrize("eval_,train,held_out", [(None, "tiny:shift", True), ("auto", "mine.jsonl", True),
                                                   ("auto", "tiny:shift", False), ("theirs.json", "mine.jsonl", False)])
def test_resume_refuses_what_changes_the_held_out_rows_only_while_they_come_out_of_train(
        tmp_path, eval_, train, held_out):
    """When the eval rows are held out of data.train (data.eval null, or auto with a file of yours), data.eval_rows
    and data.eval_fraction decide which rows a resumed run trains on; with an eval source of its own they only size
    that set. finetune.run passes the data layer's answer, finetune.data.holds_out_of_train."""
    from finetune.data import holds_out_of_train

    config = {**CONFIG, "data": {"train": train, "eval": eval_, "eval_rows": 64, "eval_fraction": 0.05}}
    fake_checkpoint(tmp_path, 2, config)
    for key, value in (("eval_rows", 32), ("eval_fraction", 0.1)):
        changed = {**config, "data": {**config["data"], key: value}}
        if held_out:
            with pytest.raises(UserError, match=rf"data.{key}=.*held out of data.train it decides which rows train"):
                checkpoints.choose("auto", str(tmp_path), changed, holds_out=holds_out_of_train)
        else:
            assert checkpoints.choose("auto", str(tmp_path), changed, holds_out=holds_out_of_train)[0].changed == []


def test_every_setting_states_what_a_resume_may_do_with_it():
    """The fixed and free settings are the schema's own metadata, not a hand list: every top-level field states
    one, and the fields under it inherit it unless they state their own."""
    import dataclasses

    from finetune.config import RESUME_RULES, Config, resume_rule

    for f in dataclasses.fields(Config):
        assert f.metadata.get("resume") in RESUME_RULES, f"Config.{f.name} states no resume rule"
    assert [resume_rule(k) for k in ("lora.r", "train.lr", "train.batch_size", "data.eval_rows", "eval.loss_t",
                                     "distributed.world_size", "model.tiny.size", "model.revision")] == [
        "fixed", "listed", "fixed", "held_out", "quiet", "launch", "fixed", "quiet"]


def test_python_m_finetune_resume_path_is_the_runs_own_command_in_its_own_directory(tmp_path):
    run = tmp_path / "run"
    checkpoint = str(run / "checkpoints" / "checkpoint-4")
    assert in_place([f"resume={checkpoint}"]) == [f"resume={checkpoint}", f"output_dir={run}"]
    (run / ".hydra").mkdir(parents=True)  # what Hydra kept of the run's last launch
    OmegaConf.save(OmegaConf.create(["recipe=chat_spark", "train.lr=1e-4", f"output_dir={run}"]),
                   run / ".hydra" / "overrides.yaml")
    assert in_place([f"resume={checkpoint}", "train.lr=5e-5"]) == [
        "recipe=chat_spark", f"resume={checkpoint}", "train.lr=5e-5", f"output_dir={run}"]
    assert in_place([f"resume={checkpoint}", "output_dir=new"]) == [
        "recipe=chat_spark", "train.lr=1e-4", f"resume={checkpoint}", "output_dir=new"]  # a branch
    assert in_place(["resume=auto"]) == ["resume=auto"]


def test_resuming_an_older_checkpoint_keeps_the_abandoned_newer_ones_aside(tmp_path):
    older = fake_checkpoint(tmp_path, 2)
    newer = fake_checkpoint(tmp_path, 4)
    decision, warnings = checkpoints.choose(str(older), str(tmp_path), CONFIG)
    assert decision.checkpoint == str(older) and decision.set_aside == [str(newer)] and "abandoned" in warnings[0]
    checkpoints.set_aside(decision.set_aside)
    assert [step for step, _ in checkpoints.listed(str(tmp_path / "checkpoints"))] == [2]
    assert any(p.name.startswith("checkpoint-4.abandoned-") for p in (tmp_path / "checkpoints").iterdir())


def test_the_old_checkpoint_keys_name_their_new_ones_and_a_sweep_cannot_resume(capsys):
    from finetune.__main__ import check
    from finetune.config import compose

    with pytest.raises(UserError, match=r"train.save_steps is now checkpoint.every"):
        compose(["train.save_steps=50"])
    assert check(["-m", "resume=auto", "lora.r=4,8"]) == 2
    assert "output_dir and resume name one run" in capsys.readouterr().err
