"""Layer types from the names a model config uses (timm's ``get_act_layer`` idea)."""
from __future__ import annotations

from functools import partial
from typing import Literal

from torch import nn

from .mlp import QuickGELU

_ACT_LAYERS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "relu": nn.ReLU}


def get_act_layer(name: Literal["gelu", "quick_gelu", "relu"]) -> type[nn.Module]:
    """The activation layer type a config names (timm's ``get_act_layer``).

    Args:
        name: ``"gelu"``, ``"quick_gelu"`` or ``"relu"``.

    >>> get_act_layer("quick_gelu")().__class__.__name__
    'QuickGELU'
    """
    try:
        return _ACT_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACT_LAYERS)}") from None


def layer_types(act: str, eps: float) -> tuple[type[nn.Module], type[nn.Module]]:
    """The (activation, norm) layer types of a config: ``get_act_layer(act)`` and LayerNorm with ``eps``.

    Args:
        act: activation name (see ``get_act_layer``).
        eps: LayerNorm epsilon.

    >>> act_layer, norm_layer = layer_types("gelu", 1e-6)
    >>> norm_layer(8).eps
    1e-06
    """
    return get_act_layer(act), partial(nn.LayerNorm, eps=eps)  # type: ignore[return-value]
