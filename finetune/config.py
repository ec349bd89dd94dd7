"""Compose the run config with Hydra: base config and groups from finetune/conf, recipes from recipes/."""

from __future__ import annotations

import glob
import os
import re

from omegaconf import DictConfig, OmegaConf

from finetune.errors import UserError

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
RECIPES_DIR = os.environ.get(
    "FINETUNE_RECIPES", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")
)


def recipe_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(RECIPES_DIR, "*.yaml")))


def _register_recipes():
    """recipes/*.yaml become the config group `recipe` (each file is a global-package experiment config)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in recipe_names():
        path = os.path.join(RECIPES_DIR, f"{name}.yaml")
        try:
            node = OmegaConf.load(path)
        except Exception as e:
            raise UserError(f"recipe file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        store.store(group="recipe", name=name, node=node, package="_global_")


def recipe_choice(overrides: list[str]) -> str:
    for o in overrides:
        if o.startswith("recipe="):
            return o.split("=", 1)[1]
    return "tiny"


def _first_message(e: BaseException) -> str:
    while e is not None:
        if str(e).strip():
            return str(e).strip().splitlines()[0]
        e = e.__cause__ or e.__context__
    return "invalid configuration"


def compose(overrides: list[str]) -> DictConfig:
    """The resolved config for these command-line overrides; a bad override is a UserError naming it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipe = recipe_choice(overrides)
    if recipe not in recipe_names():
        raise UserError(f"unknown recipe {recipe!r}: choose one of {', '.join(recipe_names())} (files in {RECIPES_DIR})")
    _register_recipes()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except Exception as e:  # hydra raises several types; the readable message may sit on a cause
        msg = _first_message(e)
        missing = re.search(r"Could not find '(\w+)/(\w+)'", msg)
        if missing:
            group, choice = missing.groups()
            options = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(CONF_DIR, group))
                             if f.endswith(".yaml")) if os.path.isdir(os.path.join(CONF_DIR, group)) else []
            msg = f"{group}={choice} is not a known {group} config; choose one of {', '.join(options)}"
        elif "not in struct" in msg or "Could not override" in msg:
            key = msg.split("'")[1] if "'" in msg else msg
            msg = f"unknown config key {key!r}: check the spelling (python -m finetune --cfg job lists every key)"
        raise UserError(msg) from None
    if cfg.run_name is None:
        OmegaConf.set_struct(cfg, False)
        cfg.run_name = recipe
        OmegaConf.set_struct(cfg, True)
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise UserError(f"config does not resolve: {str(e).splitlines()[0]}") from None
    return cfg
