import itertools
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real entry points (still run in CI)")


def assert_one_line_error(result, expected: str):
    """A command refused bad input as users should meet it: exit code 2, one `error:` line naming the problem, no
    traceback."""
    assert result.returncode == 2, (result.stdout[-500:], result.stderr[-1500:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture(scope="session")
def tokenizer():
    from finetune.tiny import build_tokenizer

    return build_tokenizer()


def make_model(tokenizer, seed=0, canvas_length=8, init=0.1):
    from transformers import DiffusionGemmaForBlockDiffusion

    from finetune.tiny import build_config

    cfg = build_config(tokenizer, canvas_length=canvas_length)
    cfg.text_config.initializer_range = init  # larger than default so logits are far from uniform
    cfg.initializer_range = init
    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(cfg).eval()


@pytest.fixture
def one_thread():
    """Generation on a tiny model is thousands of small ops: one thread is as fast on a quiet machine and does not
    slow down tenfold when other processes share the cores (thread barriers spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`python -m finetune` from a cold cache, as a fresh clone runs it; shared by the end-to-end and eval tests."""
    tmp = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE": str(tmp / "cache")}
    started = time.monotonic()
    # 30 minutes: about 6 on a quiet 2-core machine (the base's pre-training and the run), but every slow test and the
    # eval tests share this fixture, and at 600 s a loaded machine turned one slow run into 24 errors
    result = subprocess.run([sys.executable, "-m", "finetune", f"output_dir={tmp / 'run'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    # the whole process, start-up to export, for the README's "under 5 minutes" (tests/test_e2e.py)
    (tmp / "wall_seconds").write_text(f"{time.monotonic() - started:.1f}")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, env, result


CONF = os.path.join(ROOT, "finetune", "conf")


def group_file(group: str, name: str):
    """A group alternative (finetune/conf/GROUP/NAME.yaml) as Hydra places it in the config: under its group, or at
    the root when the file opens with `# @package _global_`, after the files its own defaults list pulls in (an
    alias such as hardware/spark.yaml)."""
    from omegaconf import OmegaConf

    path = os.path.join(CONF, group, f"{name}.yaml")
    with open(path) as f:  # the header: the comment lines before the first key
        header = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("#") or not line.strip(),
                                                               f)]
    node = OmegaConf.load(path) or OmegaConf.create()
    placed = OmegaConf.create()
    for entry in node.get("defaults", []):
        assert isinstance(entry, str), f"{path}: only same-group defaults (aliases) are expected here: {entry}"
        placed = OmegaConf.merge(placed, group_file(group, entry))
    body = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    return OmegaConf.merge(placed, body if "# @package _global_" in header else {group: body})


def leaf_keys(node, prefix: str = "") -> dict:
    """{dotted key: value} for every leaf of a config node."""
    from omegaconf import OmegaConf

    out = {}
    for key, value in node.items():
        if OmegaConf.is_dict(value):
            out.update(leaf_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    return out
