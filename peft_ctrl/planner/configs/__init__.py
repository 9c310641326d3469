"""Model configs for the planner: the public config values of five 7B-9B models, shipped with the package (no
download), or any ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
SHIPPED = tuple(sorted(p.stem for p in HERE.glob("*.json")))


def load_config(model: str | Any) -> Any:
    """A transformers config: ``model`` as a shipped name (``SHIPPED``), a ``config.json`` path, or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    path = HERE / f"{model}.json" if str(model) in SHIPPED else Path(model)
    if not path.is_file():
        raise ValueError(
            f"Unknown model {model!r}: give a config.json path or one of the shipped configs: {', '.join(SHIPPED)}."
        )
    values = json.loads(path.read_text())
    if "model_type" not in values:
        raise ValueError(f"{path} has no model_type, so transformers cannot tell which model it describes.")
    config = AutoConfig.for_model(**values)
    config.name_or_path = str(model)
    return config
