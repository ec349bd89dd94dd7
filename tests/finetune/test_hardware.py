"""The hardware profiles (finetune/conf/hardware/): each composes with each chat recipe and its choices arrive, the
recipes leave memory choices to the profile (so `recipe=chat_rtx hardware=rtx_5090` gets the 5090's), and the old
names `spark` and `rtx` compose exactly as `dgx_spark` and `rtx_pro_6000`."""

import glob
import os

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT, group_file, leaf_keys

# profile: (nominal memory in GB, what it must choose beyond the machine itself)
PROFILES = {
    "dgx_spark": (128, {}),
    "rtx_pro_6000": (96, {"data.max_prompt_tokens": 1024, "data.max_response_canvases": 2,
                          "train.gradient_checkpointing": True}),
    "h100": (80, {"data.max_prompt_tokens": 1024, "data.max_response_canvases": 2,
                  "train.gradient_checkpointing": True}),
    "rtx_5090": (32, {"model.quantization": "experts4bit", "train.gradient_checkpointing": True}),
    "rtx_4090": (24, {"model.quantization": "all4bit", "train.gradient_checkpointing": True,
                      "data.max_prompt_tokens": 1024, "data.max_response_canvases": 2}),
    "cpu": (None, {"hardware.device": "cpu", "hardware.bf16": False, "hardware.memory_gb": None}),
}
ALIASES = {"spark": "dgx_spark", "rtx": "rtx_pro_6000"}
CHAT_RECIPES = {"chat_spark": "dgx_spark", "chat_rtx": "rtx_pro_6000"}  # recipe: the profile it is planned for


def composed(*overrides):
    from finetune.config import compose

    cfg = compose(list(overrides))
    cfg.output_dir = None  # holds the time of composition
    return cfg


def test_the_group_holds_the_profiles_and_the_aliases():
    names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, "hardware", "*.yaml"))}
    assert names == set(PROFILES) | set(ALIASES)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_profile_says_what_the_machine_is(profile):
    """Each file opens with `# @package _global_` (it sets data.*, train.*, model.* too) and a comment giving the
    machine's memory. A card's memory_gb is its GiB in GB as nvidia-smi reports it (the plan adds the CUDA context);
    the Spark plans for less than its 128 GB: the OS and the page cache share that memory."""
    lines = open(os.path.join(CONF, "hardware", f"{profile}.yaml")).read().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# ") and len(lines[1]) > 40, lines[1]
    nominal, _ = PROFILES[profile]
    keys = leaf_keys(group_file("hardware", profile))
    if nominal is None:
        assert "hardware.memory_gb" not in keys  # null: the machine's own
        return
    assert f"{nominal} GB" in " ".join(lines[:12]), f"{profile}: the comment should state the {nominal} GB"
    assert keys["hardware.profile"] == profile and keys["hardware.device"] == "cuda" and keys["hardware.bf16"]
    if profile == "dgx_spark":
        assert nominal - 15 <= keys["hardware.memory_gb"] < nominal
    else:
        assert nominal * 1.06 <= keys["hardware.memory_gb"] <= nominal * 2**30 / 1e9


@pytest.mark.parametrize("recipe", sorted(CHAT_RECIPES))
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_composes_with_every_chat_recipe_and_its_choices_arrive(recipe, profile):
    cfg = composed(f"recipe={recipe}", f"hardware={profile}")
    got = leaf_keys(cfg)
    for key, value in {**leaf_keys(group_file("hardware", profile)), **PROFILES[profile][1]}.items():
        assert got[key] == value, f"recipe={recipe} hardware={profile}: {key}={got[key]!r}, the profile says {value!r}"
    assert cfg.hardware.profile == profile
    assert cfg.model.name_or_path == "google/diffusiongemma-26B-A4B-it"  # the recipe's own choices stay


@pytest.mark.parametrize("recipe,profile", sorted(CHAT_RECIPES.items()))
def test_each_chat_recipe_is_planned_for_its_machine(recipe, profile):
    assert composed(f"recipe={recipe}") == composed(f"recipe={recipe}", f"hardware={profile}")


def test_chat_rtx_keeps_its_choices_now_that_the_profile_makes_them():
    t, d = composed("recipe=chat_rtx").train, composed("recipe=chat_rtx").data
    assert (d.max_prompt_tokens, d.max_response_canvases, t.gradient_checkpointing) == (1024, 2, True)
    spark = composed("recipe=chat_spark")
    assert (spark.data.max_prompt_tokens, spark.data.max_response_canvases) == (2048, 4)
    assert not spark.train.gradient_checkpointing


def test_no_recipe_sets_a_key_a_profile_sets():
    """A recipe composes after the hardware group: a memory choice in the recipe would silently override the
    profile the user picked with hardware=..."""
    profile_keys = {key for name in PROFILES for key in leaf_keys(group_file("hardware", name))}
    for path in glob.glob(os.path.join(ROOT, "recipes", "*.yaml")):
        recipe = OmegaConf.load(path)
        keys = set(leaf_keys(OmegaConf.masked_copy(recipe, [k for k in recipe if k != "defaults"])))
        assert not keys & profile_keys, f"{os.path.relpath(path, ROOT)} sets {sorted(keys & profile_keys)}: move " \
                                        "them into the hardware profiles (finetune/conf/hardware/)"


@pytest.mark.parametrize("recipe", sorted(CHAT_RECIPES) + ["tiny"])
@pytest.mark.parametrize("alias,profile", sorted(ALIASES.items()))
def test_old_names_compose_the_same_config(recipe, alias, profile):
    assert composed(f"recipe={recipe}", f"hardware={alias}") == composed(f"recipe={recipe}", f"hardware={profile}")


def test_the_small_cards_quantise_the_experts_and_their_comments_quote_their_plan():
    """24 and 32 GB hold the 26B model only with its experts in 4 bits; each profile's comment quotes its plan's
    total for chat_rtx, and that number is the planner's."""
    import re

    from finetune.plan import plan

    for name in ("rtx_5090", "rtx_4090"):
        text = open(os.path.join(CONF, "hardware", f"{name}.yaml")).read()
        quoted = float(re.search(r"plans\s+~([\d.]+) GB", text).group(1))
        planned = plan(composed("recipe=chat_rtx", f"hardware={name}"))
        assert "model.quantization" in text and planned.fits, name
        assert abs((planned.peak + planned.context) / 1e9 - quoted) < 0.5, (name, quoted, planned.peak)


def test_the_removed_unified_key_names_what_does_its_job():
    """hardware.unified was read by nothing: on a machine whose CPU and GPU share one memory, the profile's
    hardware.memory_gb is the part of it a run may use."""
    from finetune.config import compose
    from finetune.errors import UserError

    with pytest.raises(UserError, match="hardware.unified is now hardware.memory_gb alone"):
        compose(["hardware=dgx_spark", "hardware.unified=true"])
