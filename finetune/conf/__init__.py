"""Hydra config groups (a package so Hydra finds them as pkg://finetune.conf from the installed command)."""
