"""peft-ctrl: research PEFT methods registered with upstream peft.

Importing this package registers every method with ``peft`` (idempotent), so ``get_peft_model`` and
``PeftModel.from_pretrained`` work with the configs below.
"""

from . import _quiet  # noqa: F401  (first: see the module)
from .dtypes import set_adapter_dtype
from .metrics import SavedTensorMeter, saved_activation_bytes
from .seal import SealConfig, SealModel
from .state_ctrl import StateCtrlConfig, StateCtrlModel
from .sublora import SubLoRAConfig, SubLoRAModel

__version__ = "0.1.0"

__all__ = [
    "SavedTensorMeter",
    "SealConfig",
    "SealModel",
    "StateCtrlConfig",
    "StateCtrlModel",
    "SubLoRAConfig",
    "SubLoRAModel",
    "saved_activation_bytes",
    "set_adapter_dtype",
]
