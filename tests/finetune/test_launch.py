"""A launch of several processes checked before anything loads: what it needs, what it refuses, and the plan of
each process. (The processes themselves run in tests/test_distributed.py.)"""

import pytest
from omegaconf import OmegaConf

from finetune.__main__ import check as check_command
from finetune.config import compose
from finetune.errors import UserError
from finetune.plan import plan
from finetune.run import check_launch


def launched(monkeypatch, processes=2):
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.setenv("RANK", "0")


def cfg(*overrides):
    c = compose(list(overrides))
    OmegaConf.resolve(c)
    return c


def test_several_processes_need_one_output_dir(monkeypatch, capsys):
    launched(monkeypatch)
    assert check_command(["train.max_steps=1"]) == 2
    assert "give output_dir=DIR, the same on every node" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, expected", [
    (["distributed=none"], "distributed=none, but this launch started 2 processes"),
    (["distributed.world_size=4"], "distributed.world_size=4, but this launch started 2 processes"),
    (["distributed=fsdp", "model.quantization=experts4bit"], "FSDP cannot shard"),
    (["distributed=fsdp"], "cannot yet train the encoder's LoRA together with self-conditioning"),
])
def test_a_launch_the_settings_cannot_train_is_refused_naming_the_key(monkeypatch, overrides, expected):
    launched(monkeypatch)
    with pytest.raises(UserError, match=expected):
        check_launch(cfg(*overrides))


def test_a_launch_records_its_processes_and_fsdp_without_self_conditioning_passes(monkeypatch):
    launched(monkeypatch)
    monkeypatch.setattr("finetune.run.base_cached", lambda path: True)
    c = cfg("distributed=fsdp", "objective.self_conditioning_p=0")
    check_launch(c)
    assert c.distributed.world_size == 2


def test_several_processes_do_not_each_pre_train_the_tiny_base(monkeypatch, tmp_path):
    launched(monkeypatch)
    with pytest.raises(UserError, match=r"build it once with one process \(python -m finetune.pretrain\)"):
        check_launch(cfg(f"cache_dir={tmp_path}"))


def test_accelerate_without_multi_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(UserError, match="add --multi_gpu"):
        check_launch(cfg())


def test_the_plan_of_each_process_divides_the_base_under_fsdp_only():
    one = plan(cfg("recipe=chat_spark", "hardware=dgx_spark"))
    ddp = plan(cfg("recipe=chat_spark", "hardware=dgx_spark", "distributed=ddp", "distributed.world_size=2"))
    fsdp = plan(cfg("recipe=chat_spark", "hardware=dgx_spark", "distributed=fsdp", "distributed.world_size=4"))

    def part(p, name):
        return sum(b for n, b, _ in p.parts if n.startswith(name))

    assert part(ddp, "weights") == part(one, "weights")  # DDP: a whole copy on every process
    assert part(ddp, "DDP gradient buckets") > 0
    assert part(fsdp, "weights") == pytest.approx(part(one, "weights") / 4, rel=1e-6)
    assert part(fsdp, "FSDP: gathered layers") > 0
    assert part(fsdp, "LoRA") == part(one, "LoRA")  # replicated, reduced as with DDP
    assert part(fsdp, "activations") == part(one, "activations")  # each process's own batch
