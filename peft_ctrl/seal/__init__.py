"""SEAL: passport watermarks for LoRA, released as plain LoRA, verified with exact statistics (docs/seal.md)."""

from peft_ctrl._registry import register

from .config import SealConfig
from .keys import KEY_ENV, generate_key
from .layer import SealLayer
from .model import SealModel

__all__ = ["KEY_ENV", "SealConfig", "SealLayer", "SealModel", "generate_key"]

register("seal", config_cls=SealConfig, model_cls=SealModel, prefix=SealModel.prefix)
