"""Safe loading: a hub base loads at model.revision, every file from the one commit that `base_commit` names;
weights only through safetensors (base and adapter); code shipped with a checkpoint only with
model.trust_remote_code.

The hub is a fake cache under tmp_path, laid out as huggingface_hub writes it (models--org--name/refs/<branch or tag>
holding a commit hash, snapshots/<hash>/ holding the files), read offline. huggingface_hub reads HF_HUB_CACHE and
HF_HUB_OFFLINE into `huggingface_hub.constants` once, at import, and both it and transformers look them up there at
each call: so this process patches those constants, and a child process (the export's reload) gets the env vars.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import ModelSettings
from finetune.errors import UserError
from finetune.model import (LoraSettings, adapter_placement, adapter_revision, attach_lora, base_commit,
                            base_identity, load, load_tokenizer, local_identity, resolve_model_path)

from conftest import ROOT, make_model

REPO = "testorg/tiny-diffusiongemma"
MAIN, OTHER = "1" * 39 + "a", "2" * 39 + "b"  # commit hashes (40 hex digits); refs/main -> MAIN, refs/v1 -> OTHER
CANVAS = {MAIN: 8, OTHER: 16}  # the two commits differ in config as well as in weights
SEED = {MAIN: 0, OTHER: 1}


@pytest.fixture
def hub(tmp_path, monkeypatch, tokenizer):
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    for commit in (MAIN, OTHER):
        model = make_model(tokenizer, seed=SEED[commit], canvas_length=CANVAS[commit])
        model.save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)  # no newline: huggingface_hub writes (and reads) the bare hash
    (repo / "refs" / "v1").write_text(OTHER)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def same_weights(model, commit, tokenizer) -> bool:
    expected = make_model(tokenizer, seed=SEED[commit], canvas_length=CANVAS[commit]).state_dict()
    got = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}  # under LoRA
    return got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("revision,commit", [(None, MAIN), ("main", MAIN), ("v1", OTHER), (OTHER, OTHER)])
def test_a_hub_base_loads_the_commit_its_revision_names_and_says_which(hub, tokenizer, revision, commit):
    model, tok, placement = load(REPO, "cpu", revision=revision)
    assert base_commit(model) == commit and placement is None
    assert model.config.canvas_length == CANVAS[commit] and same_weights(model, commit, tokenizer)
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_a_revision_the_cache_does_not_hold_is_one_line(hub):
    with pytest.raises(UserError) as e:
        load(REPO, "cpu", revision="v2")
    assert REPO in str(e.value) and "\n" not in str(e.value)


def test_a_local_base_records_its_identity_and_refuses_a_revision_set_for_it(tmp_path, tokenizer, caplog):
    """A local directory has no revisions: a load records a hash of its config and index where a hub base records
    its commit (the adapter's peft `revision` too), a later load of an adapter on changed files says so, and a
    revision given for the directory is refused."""
    base = tmp_path / "base"
    make_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, _, _ = load(str(base), "cpu")
    identity = local_identity(str(base))
    assert base_commit(model) is None and base_identity(model) == identity and identity.startswith("sha256:")
    assert "identity" not in model.config.to_json_string()  # nothing of it leaks into a saved or merged config
    adapter = tmp_path / "adapter"
    attach_lora(model, LoraSettings(r=2, alpha=4)).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["revision"] == identity
    assert adapter_revision(str(adapter)) is None  # never handed to transformers as a revision

    caplog.clear()
    load(str(base), "cpu", adapter=str(adapter))
    assert "may not hold the weights" not in caplog.text
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "canvas_length": 16}))
    assert local_identity(str(base)) != identity
    load(str(base), "cpu", adapter=str(adapter))
    assert f"hashed {identity}" in caplog.text and "may not hold the weights the adapter learnt on" in caplog.text

    for refuse in (lambda: load(str(base), "cpu", revision="main"),
                   lambda: resolve_model_path(str(base), "main"),
                   lambda: ModelSettings(revision="main")):  # name_or_path tiny: built here, a local directory
        with pytest.raises(UserError, match="model.revision='main'.*(drop model.revision|set model.revision=null)"):
            refuse()


def test_the_26b_group_pins_a_hub_id_and_plans_a_local_directory_without_an_override(tmp_path, tokenizer, capsys):
    """model=diffusiongemma_26b's revision (main, a placeholder for the commit the user validated) applies to the
    hub id only: `hf download --local-dir` gives a directory the recipes plan and train on as they are, and a
    revision the user sets for that directory is still refused."""
    from finetune.config import compose
    from finetune.plan import main as plan_main
    from finetune.pretrain import base_model_path

    base = tmp_path / "dg"
    make_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert compose(["recipe=chat_spark"]).model.revision == "main"
    assert compose(["recipe=chat_spark", "model.revision=v1"]).model.revision == "v1"
    local = compose(["recipe=chat_spark", f"model.name_or_path={base}"])
    assert local.model.revision is None and base_model_path(ModelSettings(**local.model), "") == str(base)
    assert plan_main(["recipe=chat_spark", "hardware=cpu", f"model.name_or_path={base}"]) == 0
    assert f"plan: chat_spark on cpu (cpu), {base}" in capsys.readouterr().out
    explicit = compose(["recipe=chat_spark", f"model.name_or_path={base}", "model.revision=main"])
    with pytest.raises(UserError, match=f"model.revision='main' is set but {base} is a local directory"):
        base_model_path(ModelSettings(**explicit.model), "")


def test_the_planner_and_the_preflight_read_the_config_of_the_revision(hub):
    from finetune.plan import model_config
    from finetune.preflight import tokenizer_and_canvas

    for revision, commit in (("main", MAIN), ("v1", OTHER)):
        model = ModelSettings(name_or_path=REPO, revision=revision)
        assert model_config(model).canvas_length == CANVAS[commit]
        assert tokenizer_and_canvas(SimpleNamespace(model=model))[1] == CANVAS[commit]


def test_an_adapter_records_the_base_commit_and_eval_and_export_load_that_commit(hub, tokenizer, tmp_path):
    """peft's own `revision` in adapter_config.json: the base the adapter was trained on, even once main moves."""
    from finetune.export import read_adapter, verify

    model, _, _ = load(REPO, "cpu", revision="v1")
    peft_model = attach_lora(model, LoraSettings(r=2, alpha=4))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["revision"] == OTHER
    assert adapter_revision(str(adapter)) == OTHER and read_adapter(str(adapter)).revision == OTHER
    assert adapter_revision(str(adapter), REPO, "main") == OTHER  # the record wins over the recipe's branch
    reloaded, _, _ = load(REPO, "cpu", adapter=str(adapter), revision=adapter_revision(str(adapter)))
    assert base_commit(reloaded) == OTHER and same_weights(reloaded.get_base_model(), OTHER, tokenizer)

    # the export's fresh process (stock classes) loads the same commit: here its logits are the base's at v1
    ids, canvas = torch.tensor([[5, 6, 7]]), torch.tensor([[8] * CANVAS[OTHER]])
    got = verify.reload_logits(REPO, None, "float32", "cpu", {"ids_0": ids, "canvas_0": canvas}, str(tmp_path),
                               revision=OTHER)
    with torch.no_grad():
        expected = make_model(tokenizer, seed=SEED[OTHER], canvas_length=CANVAS[OTHER])(
            input_ids=ids, decoder_input_ids=canvas).logits
    torch.testing.assert_close(got["logits_0"], expected)


def test_a_base_with_only_pickled_weights_is_refused_with_the_conversion(tmp_path, tokenizer):
    base = tmp_path / "pickled"
    make_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    os.remove(base / "model.safetensors")
    with pytest.raises(UserError) as e:
        load(str(base), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"{base} holds only pickled weights (pytorch_model.bin)" in msg
    assert "save_pretrained" in msg and "safetensors" in msg


def test_an_adapter_with_only_pickled_weights_is_refused_with_the_conversion(tmp_path, tokenizer):
    base = tmp_path / "base"
    model = make_model(tokenizer)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = tmp_path / "adapter"
    attach_lora(model, LoraSettings(r=2, alpha=4)).save_pretrained(adapter)
    assert adapter_placement(str(adapter)) == "shared"
    weights = load_file(adapter / "adapter_model.safetensors")
    torch.save(weights, adapter / "adapter_model.bin")
    os.remove(adapter / "adapter_model.safetensors")
    with pytest.raises(UserError) as e:
        load(str(base), "cpu", adapter=str(adapter))
    msg = str(e.value)
    assert "\n" not in msg and "holds only pickled weights (adapter_model.bin)" in msg

    # the command in the message converts it, and the adapter loads again
    command = msg.split('python -c "', 1)[1].rsplit('"', 1)[0]
    subprocess.run([sys.executable, "-c", command], check=True, cwd=ROOT)
    converted = load_file(adapter / "adapter_model.safetensors")
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], v) for k, v in weights.items())
    load(str(base), "cpu", adapter=str(adapter))


CUSTOM_TOKENIZER = """from transformers import TokenizersBackend


class CustomTokenizer(TokenizersBackend):
    shipped_with_the_checkpoint = True
"""


@pytest.fixture
def custom_code_base(tmp_path, tokenizer):
    """A base whose tokenizer_config.json maps AutoTokenizer to a class in a .py file beside it."""
    base = tmp_path / "custom"
    make_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "custom_tokenizer.py").write_text(CUSTOM_TOKENIZER)
    return base


def test_a_tokenizer_that_ships_its_own_code_is_refused_unless_trusted(custom_code_base, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    # without the refusal transformers would not run the code either, but would quietly load a built-in class
    with pytest.raises(UserError) as e:
        load(str(custom_code_base), "cpu")
    msg = str(e.value)
    assert "\n" not in msg and "tokenizer_config.json maps AutoTokenizer" in msg and "model.trust_remote_code" in msg

    # trusted, the class from the checkpoint is used (copied into a modules cache of its own here)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        tok = load_tokenizer(str(custom_code_base), trust_remote_code=True)
        assert type(tok).__name__ == "CustomTokenizer" and tok.shipped_with_the_checkpoint
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]


def test_a_config_that_ships_its_own_code_is_refused(tmp_path, tokenizer):
    base = tmp_path / "custom_config"
    make_model(tokenizer).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "my_config.MyConfig"}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json maps AutoConfig .*model.trust_remote_code=true"):
        load(str(base), "cpu")


def test_a_resumed_run_loads_the_base_at_the_commit_its_checkpoint_recorded(hub, tmp_path, capsys):
    """The hub's main moves between a kill and the resume: the resume still loads the commit it trained on."""
    import shutil

    from finetune.config import compose
    from finetune.run import run

    run_dir = tmp_path / "run"
    args = [f"model.name_or_path={REPO}", "model.revision=main", "data.train_rows=16", "data.eval_rows=4",
            "train.batch_size=8", "train.max_steps=2", "checkpoint.every=1", "eval.enabled=false",
            "export.format=none", "train.report_to=none", f"output_dir={run_dir}"]
    assert run(compose(args))["base_commit"] == MAIN
    shutil.rmtree(run_dir / "adapter")  # as if killed after its last checkpoint
    (hub / "refs" / "main").write_text(OTHER)
    metrics = run(compose(args))
    assert f"the base is loaded at commit {MAIN}" in capsys.readouterr().out
    assert metrics["base_commit"] == MAIN and metrics["training"]["resumed_from"].endswith("checkpoint-2")


def test_a_resumed_run_refuses_a_local_base_whose_files_changed(tmp_path, tokenizer):
    """A local base has no commit to go back to: a resume on a directory whose config or index changed since the
    checkpoint (another download, another model saved there) stops before loading, naming both hashes."""
    import shutil

    from finetune.config import compose
    from finetune.run import run

    base, run_dir = tmp_path / "base", tmp_path / "run"
    make_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    args = [f"model.name_or_path={base}", "data.train_rows=16", "data.eval_rows=4", "train.batch_size=8",
            "train.max_steps=2", "checkpoint.every=1", "eval.enabled=false", "export.format=none",
            "train.report_to=none", f"output_dir={run_dir}"]
    identity = local_identity(str(base))
    assert run(compose(args))["base_identity"] == identity
    assert json.loads((run_dir / "checkpoints" / "checkpoint-2" / "manifest.json").read_text())[
        "base_identity"] == identity
    shutil.rmtree(run_dir / "adapter")  # as if killed after its last checkpoint
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "initializer_range": 0.5}))
    with pytest.raises(UserError, match=f"{base} has changed since .*checkpoint-2.*hashed {identity}, now sha256:"):
        run(compose(args))
