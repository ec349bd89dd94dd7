"""python -m finetune.doctor: each check on a faked machine (`finetune.doctor.Facts`), and the real command on this one.

The faked machines are made up (a GB10, an sm_120 card on an old build, a CPU box); no figure here comes from the
machine that runs the tests, so the same tests hold on a laptop, a CI runner and a DGX Spark."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from finetune import disk, doctor
from finetune.config import compose

GB = 10**9
NAMES = ["python", "torch", "driver", "device", "bitsandbytes", "memory", "disk", "model access", "vllm"]
CPU = doctor.Facts(python=(3, 11, 7), torch="2.13.0+cpu", ram_available=64 * GB, bitsandbytes="0.50.2")
CUDA13_ARCHS = ["sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # a CUDA 13 build's, up to sm_120
GB10 = dataclasses.replace(CPU, torch="2.13.0+cu130", cuda_build="13.0", arch_list=CUDA13_ARCHS,
                           gpu_name="NVIDIA GB10", capability=(12, 1), gpu_free=110 * GB, gpu_total=128 * GB,
                           driver="580.95.05", driver_cuda="13.0", smi_gpu="NVIDIA GB10")
# an RTX 5090 (sm_120) under a build for CUDA 12.6, whose arch list stops at sm_90
OLD_BUILD = dataclasses.replace(GB10, torch="2.8.0+cu126", cuda_build="12.6", arch_list=["sm_80", "sm_86", "sm_90"],
                                gpu_name="NVIDIA GeForce RTX 5090", capability=(12, 0), driver="570.86.10",
                                driver_cuda="12.8", smi_gpu="NVIDIA GeForce RTX 5090")


def checks_of(out: str) -> list:
    """[(status, name, text with its fix)] from the doctor's output, in order."""
    found = []
    for line in out.splitlines():
        if not line.startswith("  "):
            continue
        status, name, text = line[2:7].strip(), line[8:21].strip(), line[22:]
        if status:
            found.append([status, name, text])
        else:  # a fix, under its check
            found[-1][2] += "\n" + text
    return [tuple(c) for c in found]


def only(out: str, name: str) -> tuple:
    [found] = [c for c in checks_of(out) if c[1] == name]
    return found


@pytest.fixture
def machine(monkeypatch, tmp_path, capsys):
    """Run `python -m finetune.doctor ARGS` in this process on a faked machine: its facts, an empty tiny cache and hub
    cache, and a large disk. Returns run(facts, *args) -> (exit code, stdout)."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # outputs/ of the run
    monkeypatch.setattr(doctor, "in_hub_cache", lambda *a, **k: None)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10**15)

    def run(facts, *args):
        monkeypatch.setattr(doctor, "gather", lambda: facts)
        code = doctor.main(list(args))
        return code, capsys.readouterr().out

    return run


@pytest.fixture(scope="module")
def spark():
    """chat_spark with no memory figure of its own (hardware.memory_gb=null): the GPU's free memory decides, and its
    plan (the 26B config on meta, about a second), made once."""
    cfg = compose(["recipe=chat_spark", "hardware.memory_gb=null"])
    current, sizes = doctor.plan_run(cfg)
    return cfg, current


@pytest.fixture
def sizes():
    """A made-up model for the disk checks: 1M parameters stored in fp32, 10k of LoRA."""
    return doctor.Sizes(parameters=10**6, stored_bytes=4 * 10**6, trainable=10**4)


# --- the whole command on a faked machine ------------------------------------------------------------------------
def test_a_cpu_machine_is_ready_for_the_tiny_recipe(machine):
    code, out = machine(CPU, "recipe=tiny")
    assert code == 0, out
    checks = checks_of(out)
    assert [name for _, name, _ in checks] == NAMES
    assert not [c for c in checks if c[0] == "FAIL"], out
    assert out.splitlines()[-1].startswith("doctor: ready")


def test_a_gpu_recipe_on_a_machine_without_a_gpu_fails_and_says_what_to_do(machine):
    code, out = machine(CPU, "recipe=chat_spark")
    assert code == 1
    status, _, text = only(out, "device")
    assert status == "FAIL" and "hardware.device=cuda" in text
    assert "fix: " in text and "recipe=tiny" in text and "--index-url https://download.pytorch.org/whl/cu1" in text
    assert "device" in out.splitlines()[-1]  # the summary names it


# --- torch against the GPU ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability,archs,served", [
    ((12, 1), ["sm_90", "sm_120"], ("compatible", "sm_120")),  # GB10: binary compatible within major 12
    ((12, 0), ["sm_80", "sm_90"], None),  # an sm_120 card on a build that stops at sm_90
    ((8, 6), ["sm_80", "sm_86"], ("exact", "sm_86")),
    ((9, 0), ["sm_80", "compute_80"], ("ptx", "compute_80")),  # no sm_9x cubin: the driver compiles the PTX
    ((10, 3), ["sm_100a"], None),  # arch-specific cubins run only on their own GPU
    ((8, 7), ["sm_80"], None),  # an integrated (Jetson) GPU takes only its own cubins
])
def test_which_kernels_serve_a_gpu(capability, archs, served):
    assert doctor.kernels_for(capability, archs) == served


def test_a_gb10_on_a_build_up_to_sm_120_is_ok_and_the_capability_warning_harmless():
    check = doctor.check_torch(GB10)
    assert check.status == "ok" and "sm_121" in check.detail and "sm_120" in check.detail
    assert "harmless" in check.detail and "minimum and maximum cuda capability" in check.detail


def test_an_sm_120_gpu_on_a_build_up_to_sm_90_fails_with_the_install_command():
    check = doctor.check_torch(OLD_BUILD)
    assert check.status == "FAIL" and "sm_90" in check.detail
    # its driver (570) runs CUDA 12.8, not 13: the cu128 index
    assert "pip uninstall -y torch && pip install" in check.fix
    assert "--index-url https://download.pytorch.org/whl/cu128" in check.fix


# --- the driver --------------------------------------------------------------------------------------------------
def test_a_driver_older_than_a_cuda_13_build_needs_fails():
    check = doctor.check_driver(dataclasses.replace(GB10, driver="575.51.03", driver_cuda="12.9"))
    assert check.status == "FAIL" and f">= {doctor.MIN_DRIVER[(13, 0)]}" in check.detail
    assert "update the NVIDIA driver" in check.fix and "whl/cu128" in check.fix  # or a build this driver runs


def test_a_cpu_machine_has_no_driver_to_check():
    check = doctor.check_driver(CPU)
    assert check.status == "skip" and "no GPU" in check.detail


# --- bitsandbytes ------------------------------------------------------------------------------------------------
def test_quantization_without_bitsandbytes_fails_naming_the_extra():
    cfg = compose(["recipe=chat_rtx", "hardware=rtx_5090"])  # model.quantization=experts4bit
    check = doctor.check_bitsandbytes(cfg, dataclasses.replace(GB10, bitsandbytes=None))
    assert check.status == "FAIL" and "experts4bit" in check.detail
    assert check.fix == 'pip install -e ".[quant]"'


# --- memory ------------------------------------------------------------------------------------------------------
def test_gpu_memory_below_the_plan_fails_naming_the_planner(spark):
    cfg, current = spark
    check = doctor.check_memory(cfg, dataclasses.replace(GB10, gpu_free=GB), current, ["recipe=chat_spark"])
    assert check.status == "FAIL" and check.detail.startswith("does not fit")
    assert "python -m finetune.plan recipe=chat_spark" in check.fix


def test_gpu_memory_above_the_plan_fits(spark):
    cfg, current = spark
    check = doctor.check_memory(cfg, dataclasses.replace(GB10, gpu_free=10**14), current, ["recipe=chat_spark"])
    assert check.status == "ok" and check.detail.startswith("fits")


# --- disk --------------------------------------------------------------------------------------------------------
def test_a_disk_too_small_fails(monkeypatch, tmp_path, sizes):
    monkeypatch.setattr(disk, "free_bytes", lambda path: 0)
    cfg = compose(["recipe=tiny", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    [check] = doctor.check_disk(cfg, sizes)  # cache and outputs: one filesystem, one line
    assert check.status == "FAIL" and "output_dir=" in check.fix and "cache_dir=" in check.fix


def test_a_hub_models_weights_are_counted_a_local_directorys_not(monkeypatch, tmp_path, sizes):
    monkeypatch.setattr(doctor, "in_hub_cache", lambda *a, **k: None)
    hub = compose(["recipe=chat_spark", f"output_dir={tmp_path / 'run'}"])
    local = compose(["recipe=chat_spark", f"output_dir={tmp_path / 'run'}", f"model.name_or_path={tmp_path}"])
    weights = {n.what: n.nbytes for n in doctor.disk_needs(hub, sizes)}["base weights"]
    assert weights == sizes.stored_bytes
    assert "base weights" not in {n.what for n in doctor.disk_needs(local, sizes)}


def test_the_tiny_recipe_writes_little(tmp_path):
    cfg = compose(["recipe=tiny", f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    _, sizes = doctor.plan_run(cfg)
    assert sum(n.nbytes for n in doctor.disk_needs(cfg, sizes)) < GB


# --- model access ------------------------------------------------------------------------------------------------
def test_a_hub_model_without_a_token_fails_with_hf_auth_login(monkeypatch):
    monkeypatch.setattr(doctor, "in_hub_cache", lambda *a, **k: None)
    check = doctor.check_model_access(compose(["recipe=chat_spark"]), CPU)
    assert check.status == "FAIL" and check.fix.startswith("hf auth login")
    assert "https://huggingface.co/google/diffusiongemma-26B-A4B-it" in check.fix
    assert "huggingface-cli" not in check.fix  # gone from huggingface_hub >= 1.0


def test_offline_with_the_model_in_the_hub_cache_is_ok(monkeypatch, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    monkeypatch.setattr(doctor, "in_hub_cache", lambda repo, name, revision=None: str(tmp_path / name))
    check = doctor.check_model_access(compose(["recipe=chat_spark"]), dataclasses.replace(CPU, hf_offline=True))
    assert check.status == "ok" and "hub cache" in check.detail


def test_a_local_directory_with_a_config_is_ok(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check = doctor.check_model_access(compose(["recipe=chat_spark", f"model.name_or_path={tmp_path}"]), CPU)
    assert check.status == "ok" and str(tmp_path) in check.detail


# --- the real command, on this machine ---------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,code", [("tiny", 0), ("chat_spark", 1)])
def test_the_command_on_this_machine(recipe, code, tmp_path):
    """tiny is ready anywhere; chat_spark fails wherever its model is not in the hub cache (an empty one here), GPU or
    not. Nothing is downloaded: HF_HUB_OFFLINE."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(tmp_path / "cache"),
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "finetune.doctor", f"recipe={recipe}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stdout + result.stderr[-2000:]
    assert [name for _, name, _ in checks_of(result.stdout)] == NAMES
    assert "Traceback" not in result.stderr
