"""Reading fields of a Hugging Face config.json: a required one, and the rotary parameters as
transformers takes them."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def need(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """The rotary parameters as transformers takes them: ``rope_scaling`` (the older name) where
    it is set, in place of ``rope_parameters``, not merged with it."""
    scaling, parameters = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    if scaling and parameters:
        used = {**scaling, "rope_theta": scaling.get("rope_theta", cfg.get("rope_theta", 10000.0))}
        used.setdefault("rope_type", scaling.get("type"))  # the older spelling of the kind
        lost = any(used.get(k) != v for k, v in parameters.items())
    if scaling and parameters and lost:
        log.warning(
            "config.json sets both rope_scaling and rope_parameters: rope_scaling is used and rope_parameters "
            "%s is ignored, as transformers does (a rope_theta in it too: it comes from the top level or "
            "defaults to 10000); keep one of the two",
            json.dumps(parameters),
        )
    return dict(scaling or parameters or {})
