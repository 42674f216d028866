"""Configs read back from storage: a train checkpoint's `config` item and a checkpoint directory's model
section (`vlm_jax.json`). Every saved config becomes a ConfigDict here and nowhere else, so configs written by
older versions are brought up to date in one place."""

from typing import Any

import ml_collections


def saved_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """The full run config a train checkpoint saved."""
    return ml_collections.ConfigDict(saved)


def saved_model_config(saved: dict[str, Any]) -> ml_collections.ConfigDict:
    """The model config a checkpoint directory's `vlm_jax.json` (or a train checkpoint's `model` section) saved."""
    return ml_collections.ConfigDict(saved)
