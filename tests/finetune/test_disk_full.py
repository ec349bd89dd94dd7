"""A full disk at each write site (finetune.disk): one `error:` line naming the path and the space needed, exit code 1,
the staging removed, and what was there before intact, checked by its manifest (a sealed checkpoint) or byte for byte
(an export, a report). ENOSPC is injected by wrapping the site's write call; one test fills a real tmpfs where
`unshare -Urm` is allowed."""

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from finetune import checkpoints, disk
from finetune import export as ex
from finetune.errors import run_cli
from finetune.export import staging
from finetune.model import LoraSettings, attach_lora
from finetune.run import _kept_checkpoint, save_adapter

from conftest import ROOT, make_model
from test_checkpoints import fake_checkpoint
from test_export import base_dir, make_run, tree  # noqa: F401 (base_dir: the tiny base fixture)
from test_resume import train


def enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def half_then_full(path, data=b"\0" * 100):
    """What a write does when the disk fills: some bytes land, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(data)
    raise enospc(path)


def assert_one_error_line_exit_1(body, *expected):
    """``body`` under the commands' run_cli: exit code 1, one `error:` line holding each of ``expected``."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = run_cli(body)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error: ")]  # (loading bars aside)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err.getvalue(), (code, err.getvalue()[-2000:])
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def no_leftovers(root):
    """No staging file or directory with anything in it (an empty checkpoints/.staging is nothing to trip on)."""
    left = [os.path.join(r, n) for r, dirs, files in os.walk(root) for n in dirs + files
            if n.endswith((".partial", ".tmp")) or ".tmp-" in n
            or n == checkpoints.STAGING and os.listdir(os.path.join(r, n))]
    assert not left, left


# --- checkpoint -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("site", ["optimizer.pt", checkpoints.MANIFEST])
def test_checkpoint_write_site(tokenizer, tmp_path, monkeypatch, site):
    """The second checkpoint's Trainer file (optimizer.pt) or our seal (its manifest) meets a full disk: the first
    checkpoint stays sealed, nothing of the second is left, the message names the checkpoint and the space."""
    root = tmp_path / "checkpoints"
    real_save, real_json, calls = torch.save, checkpoints.write_json, []

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(site) and "checkpoint-4" in str(path):
            half_then_full(path)
        return real_save(obj, path, *args, **kwargs)

    def write_json(path, data):
        if path.endswith(site) and "checkpoint-4" in path:
            half_then_full(path + ".partial")
        calls.append(path)
        return real_json(path, data)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(checkpoints, "write_json", write_json)
    first = str(root / "checkpoint-2")
    line = assert_one_error_line_exit_1(lambda: train(tokenizer, root, max_steps=6, every=2) and 0,
                                        f"disk full writing {root / checkpoints.STAGING / 'checkpoint-4'}",
                                        f"the last sealed checkpoint, {first}, is intact")
    assert f": {disk.human(disk.size(first))} needed, " in line and " free there" in line  # a checkpoint's size
    assert [p for _, p in checkpoints.listed(str(root))] == [first]
    assert checkpoints.verify(first) is None
    no_leftovers(tmp_path)


# --- adapter --------------------------------------------------------------------------------------------------------
def test_adapter_save_write_site(tokenizer, tmp_path, monkeypatch):
    """The end of a run saves adapter/ (adapter.tmp, then renamed): a full disk there leaves neither, and the run's
    last sealed checkpoint, which the same command continues from, verifies."""
    import peft.peft_model

    sealed = fake_checkpoint(tmp_path, 6)
    model = attach_lora(make_model(tokenizer), LoraSettings(r=4, alpha=8))
    monkeypatch.setattr(peft.peft_model, "safe_save_file", lambda tensors, path, **kw: half_then_full(path))
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    path = tmp_path / "adapter"
    assert_one_error_line_exit_1(
        lambda: save_adapter(model, tokenizer, str(path), kept=_kept_checkpoint(str(tmp_path / "checkpoints"))),
        f"disk full writing {path}: {disk.human(needed)} needed", f"the last sealed checkpoint, {sealed}, is intact")
    assert not path.exists() and not (tmp_path / "adapter.tmp").exists()
    assert checkpoints.verify(str(sealed)) is None
    no_leftovers(tmp_path)


# --- metrics, trace and report ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["metrics.json", checkpoints.TRACE, "report.json"])
def test_metrics_and_report_write_site(tmp_path, monkeypatch, name):
    """metrics.json, the run's trace.json and eval's report.json are written whole: a full disk mid-write leaves the
    earlier file as it was (never a truncated JSON), and the run's sealed checkpoint verifies."""
    sealed = fake_checkpoint(tmp_path, 6)
    path = tmp_path / name
    path.write_text('{"earlier": true}')
    real_dump = json.dump

    def dump(obj, f, **kwargs):
        f.write('{"half": ')
        raise enospc(f.name)

    monkeypatch.setattr(json, "dump", dump)
    if name == "report.json":
        from eval import report

        monkeypatch.setattr(report, "plot_loss_by_t", lambda *a: None)
        monkeypatch.setattr(report, "plot_scores", lambda *a: None)
        monkeypatch.setattr(report, "markdown", lambda r: "# report\n")
        write = lambda: report.write_report({"sweep": None}, str(tmp_path)) and 0  # noqa: E731
    else:
        write = lambda: disk.write_json(str(path), {"losses": [1.0] * 1000}, indent=2)  # noqa: E731
    assert_one_error_line_exit_1(write, f"disk full writing {path}")
    monkeypatch.setattr(json, "dump", real_dump)
    assert path.read_text() == '{"earlier": true}'
    assert checkpoints.verify(str(sealed)) is None
    no_leftovers(tmp_path)


def test_loss_curve_write_site(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from finetune.report import plot_loss

    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: half_then_full(path))
    path = tmp_path / "loss_curve.png"
    assert_one_error_line_exit_1(lambda: plot_loss([1.0, 0.5], [], str(path)), f"disk full writing {path}")
    assert not path.exists()
    no_leftovers(tmp_path)


# --- export ---------------------------------------------------------------------------------------------------------
def test_export_write_site(tmp_path, tokenizer, base_dir, monkeypatch):  # noqa: F811
    """A merged export meets a full disk after its first shard: the staging directory is removed, the earlier
    adapter export and the run are byte for byte as they were, and the message names the export and its size."""
    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir)
    ex.export_run(run_dir, ex.ExportSettings(format="adapter", verify=False))  # an earlier, complete export
    before = tree(run_dir)
    real, written = staging.write_shard, []

    def full_after_first(tensors, path):
        if written:
            from safetensors.torch import save_file

            return disk.write_whole(path, lambda partial: (save_file(tensors, partial), half_then_full(partial)))
        real(tensors, path)
        written.append(path)

    monkeypatch.setattr(staging, "write_shard", full_after_first)
    out = os.path.join(run_dir, "export", "merged")
    line = assert_one_error_line_exit_1(
        lambda: ex.export_run(run_dir, ex.ExportSettings(format="merged", dtype="float32", max_shard_size="200KB"))
        and 0, f"disk full writing {out}: ", "needed", "any earlier export are untouched")
    assert written and "free there" in line
    assert tree(run_dir) == before  # no staging left; adapter, metrics and the earlier export byte-identical
    no_leftovers(run_dir)


def test_a_merged_export_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, tokenizer, base_dir,  # noqa: F811,E501
                                                                               monkeypatch, capsys):
    from finetune.export.cli import main as export_main

    run_dir, _ = make_run(tmp_path / "run", tokenizer, base_dir)
    before = tree(run_dir)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 << 30, 10 << 30, 1000))
    assert export_main([f"run_dir={run_dir}", "format=merged", "dtype=float32"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: not enough disk space for the export at "), lines
    assert "merged" in lines[0] and f"{disk.human(1000)} free" in lines[0] and "needed" in lines[0]
    assert tree(run_dir) == before and not os.path.exists(os.path.join(run_dir, "export"))


def test_the_merged_size_is_the_tensors_at_the_export_dtype(tokenizer, base_dir):  # noqa: F811
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.export import merge

    model = attach_lora(DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir), LoraSettings(r=4, alpha=8))
    plan = merge.merge_plan(model)
    params = sum(t.numel() for t in plan.tensors.values())
    assert merge.merged_bytes(plan, "float32") == 4 * params and merge.merged_bytes(plan, "bfloat16") == 2 * params


# --- a real full disk -----------------------------------------------------------------------------------------------
FILL = """
import json, os, subprocess, sys
sys.path[:0] = [{root!r}, {tests!r}, {tests_finetune!r}]
disk_dir = {disk!r}
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", disk_dir], check=True)
from transformers import TrainerCallback
from finetune import checkpoints
from finetune.errors import run_cli
from finetune.tiny import build_tokenizer
from test_resume import train

class Fill(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # after the first checkpoint is sealed: fill the disk
        if state.global_step == 2:
            with open(os.path.join(disk_dir, "filler"), "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\\0" * 4096)
                except OSError:
                    pass

root = os.path.join(disk_dir, "checkpoints")
code = run_cli(lambda: train(build_tokenizer(), root, max_steps=6, every=2, callbacks=[Fill()]) and 0)
listed = checkpoints.listed(root)
left = sorted(n for r, d, f in os.walk(disk_dir) for n in d + f)
print(json.dumps({{"code": code, "listed": [p for _, p in listed], "verify": [checkpoints.verify(p) for _, p in listed],
                  "left": left}}))
"""


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="unshare -Urm (a user and mount namespace to mount a tmpfs) is not "
                    "allowed here: the injected ENOSPC tests above cover the write sites")
def test_a_real_full_tmpfs_at_a_checkpoint(tmp_path):
    """torch.save on a disk that is really full says "unexpected pos", not ENOSPC: still one line, exit 1."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = FILL.format(root=ROOT, tests=os.path.join(ROOT, "tests"), tests_finetune=os.path.join(ROOT, "tests",
                                                                                                   "finetune"),
                         disk=str(mount))
    result = subprocess.run(["unshare", "-Urm", sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert report["code"] == 1 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: disk full writing {mount}/checkpoints/.staging/checkpoint-4"), errors
    assert report["listed"] == [f"{mount}/checkpoints/checkpoint-2"] and report["verify"] == [None]
    assert ".staging" not in report["left"] and not [n for n in report["left"] if n.endswith(".partial")]
