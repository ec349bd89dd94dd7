"""The docs are true to the code: the Quickstart is two commands that CI runs, and every `python -m finetune` and
`python -m eval` command the README and playbooks print composes a valid config (the GPU ones cannot run here)."""

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_blocks(text):
    return re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S)


def test_quickstart_is_two_commands_and_ci_runs_the_same():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Quickstart", 1)[1]
    commands = [line for line in code_blocks(section)[0].splitlines() if line.strip()]
    assert len(commands) == 2, commands
    install_and_run, test = commands
    assert install_and_run.endswith("python -m finetune")
    assert test == "python -m pytest"
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert re.search(r"^python -m pytest$", ci, flags=re.M)
    for step in ("python3 -m venv .venv", "pip install -q torch==2.13.0", 'pip install -q -e ".[dev'):
        assert step in ci  # CI adds optional extras (lm-eval) so their tests run
    for step in ("python3 -m venv .venv", "pip install torch==2.13.0", 'pip install -e ".[dev]"'):
        assert step in install_and_run


def documented(prefix, placeholders=False):
    """(file, command) for each line of a README/playbook code block that starts with ``prefix``."""
    found = []
    for path in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "playbooks", "*", "README.md")):
        for block in code_blocks(open(path).read()):
            for line in block.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith(prefix) and (placeholders or "<" not in line):
                    found.append((os.path.relpath(path, ROOT), line))
    return found


@pytest.mark.parametrize("where,command", documented("python -m finetune "))
def test_documented_commands_compose(where, command, capsys, monkeypatch):
    """Every job the command would start composes and passes the checks a run makes before it writes anything
    (a -m sweep: each combination)."""
    from finetune.__main__ import check
    from finetune.cli import HYDRA_ANSWERS

    args = shlex.split(command)[3:]
    if any(a in HYDRA_ANSWERS for a in args):  # answered by Hydra itself (--info, --help): run it for real
        result = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 0 and result.stdout.strip(), f"{where}: {command}\n{result.stderr[-1500:]}"
        return
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check(args) == 0, f"{where}: {command}\n{capsys.readouterr().err}"


@pytest.mark.parametrize("where,command", documented("python -m finetune.preflight"))
def test_documented_preflight_commands_run(where, command, tmp_path):
    args = shlex.split(command)[3:]
    if any(a.startswith("recipe=chat_") for a in args):  # needs the real tokenizer from the hub: compose only
        result = subprocess.run([sys.executable, "-m", "finetune", *args, "--cfg", "job"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    else:
        result = subprocess.run([sys.executable, "-m", "finetune.preflight", *args, f"output_dir={tmp_path}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=180,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert "rendered examples" in result.stdout
    assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-1500:]}"


@pytest.mark.parametrize("where,command", documented("python -m eval ", placeholders=True))
def test_documented_eval_commands_check(where, command, tmp_path, capsys, monkeypatch):
    """Each documented `python -m eval` command passes the CLI's checks (`--cfg job`); the adapter placeholder
    (outputs/<run>/adapter) stands for an adapter directory. The slow eval tests run the tiny one for real."""
    from eval.__main__ import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "google/diffusiongemma-26B-A4B-it"}')
    args = [re.sub(r"^adapter=.*<.*>.*$", f"adapter={adapter}", a) for a in shlex.split(command)[3:]]
    assert not any("<" in a for a in args), f"{where}: placeholder outside adapter=: {command}"
    monkeypatch.setenv("FINETUNE_CACHE", "/nonexistent-cache-should-not-be-used")
    assert main(args + ["--cfg", "job"]) == 0, f"{where}: {command}\n{capsys.readouterr().err}"


def test_documented_harness_commands_name_the_registered_model():
    commands = documented("python -m eval.harness ", placeholders=True)
    assert commands
    for where, command in commands:
        assert "--model diffusiongemma" in command and "--apply_chat_template" in command, (where, command)


def test_docs_name_only_recipes_that_exist():
    recipes = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))}
    for path in [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "playbooks", "*", "README.md")):
        for name in re.findall(r"recipe=(\w+)", open(path).read()):
            assert name in recipes, (path, name)
