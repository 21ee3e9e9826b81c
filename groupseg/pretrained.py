"""Where weights come from: explicit paths, ``GROUPSEG_WEIGHTS``, the user cache, shipped weights."""
from __future__ import annotations

import os
from pathlib import Path

from .convert import CheckpointError

ENV_VAR = "GROUPSEG_WEIGHTS"
SHIPPED_DIR = Path(__file__).parent / "weights" / "default"


def cache_dir() -> Path:
    """The user cache for weights: ``$XDG_CACHE_HOME/groupseg`` (``~/.cache/groupseg``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "groupseg"


def default_weights() -> Path | None:
    """The best weights found locally, in order: ``$GROUPSEG_WEIGHTS``, the user cache's
    ``default/`` directory, the weights shipped inside the package. ``None`` if none exist."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise CheckpointError(f"{ENV_VAR}={env} does not exist")
        return p
    for p in (cache_dir() / "default", SHIPPED_DIR):
        if (p / "model.safetensors").exists():
            return p
    return None


def resolve_weights(source: str | Path | None) -> str | Path:
    """An explicit source as is (a path, or a hub id as ``hf-hub:OWNER/NAME``, see
    ``groupseg.factory.hub_snapshot``); ``None`` or ``"default"`` -> ``default_weights()``."""
    if source not in (None, "", "default"):
        return source
    found = default_weights()
    if found is None:
        raise CheckpointError(
            f"no default weights found: pass --weights DIR, set {ENV_VAR}, put a model in {cache_dir() / 'default'}, "
            "or train one with `groupseg train`"
        )
    return found
