"""The one place where peft-ctrl touches peft internals.

Upstream ``peft.utils.register_peft_method`` only accepts names that are already members of the
``PeftType`` enum, so a plugin cannot use it on its own. ``register`` first adds the member to
``PeftType`` (the enum stays a ``str`` enum: ``PeftType("STATE_CTRL")``, iteration and JSON
round-trips work like for built-in members), then calls the public ``register_peft_method``.

``tests/test_registry.py`` checks every assumption made here, so a peft release that changes them
fails loudly in CI instead of silently mis-registering a method.

``PeftModel.save_pretrained`` writes files in place, so a failure midway (disk full) would leave a broken or
mixed adapter where a good one was. ``register`` therefore also wraps it (once) so that adapters of our
methods are written to a temporary directory and moved into place only when complete (``peft_ctrl.atomic``);
models holding only upstream methods are saved by peft's own code, unchanged.

peft loads adapter tensors leniently: tensors the model has no place for are skipped, missing ones keep their
initial values. ``StrictLoadMixin`` (a base of our tuners) hooks the per-method remapping step that peft runs
on every checkpoint and refuses both, naming the tensors.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import PeftType, register_peft_method

from .atomic import atomic_directory

# The PeftTypes registered by this package: their adapters are saved atomically.
OWN_TYPES: set[PeftType] = set()


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to peft's enum first if it is not a member yet.

    Idempotent: a second call returns the same member.
    """
    if not name.isupper() or not name.replace("_", "").isalnum():
        raise ValueError(f"PeftType names are upper-case identifiers, got {name!r}.")
    if name in PeftType.__members__:
        return PeftType[name]
    if not (issubclass(PeftType, str) and issubclass(PeftType, enum.Enum)):
        raise RuntimeError(
            "peft.utils.PeftType is no longer a str Enum; peft_ctrl/_registry.py must be updated for this "
            "peft release."
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # The class attribute must be set before the member map is updated: EnumType.__setattr__ refuses to
    # reassign names that are already members.
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register a PEFT method with upstream peft under ``name`` (lower case, e.g. ``"state_ctrl"``).

    Safe to call more than once with the same classes (re-imports, ``importlib.reload``); a different
    class under an existing name is an error, because it would silently change how saved adapters load.
    """
    peft_type = add_peft_type(name.upper())
    OWN_TYPES.add(peft_type)
    install_atomic_save()
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        same = registered.__qualname__ == config_cls.__qualname__ and registered.__module__ == config_cls.__module__
        if not same:
            raise ValueError(
                f"The PEFT type {peft_type.value} is already registered with {registered.__module__}."
                f"{registered.__qualname__}; refusing to replace it with "
                f"{config_cls.__module__}.{config_cls.__qualname__}."
            )
        # Same class (possibly re-created by a reload): point peft at the newest objects.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return peft_type
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type


def holds_own_adapter(model: PeftModel) -> bool:
    """Whether ``model`` carries an adapter of one of this package's methods."""
    return any(config.peft_type in OWN_TYPES for config in model.peft_config.values())


def install_atomic_save() -> None:
    """Make ``PeftModel.save_pretrained`` atomic for models holding our adapters (idempotent).

    peft writes every file (weights, config, model card) under ``save_directory``; the wrapper hands it an
    empty temporary directory beside the target instead and moves the finished files in afterwards. Ranks
    other than the main one (``is_main_process=False``) write nothing and go straight to peft.
    """
    original = PeftModel.save_pretrained
    if getattr(original, "_peft_ctrl_atomic", False):
        return
    parameters = list(inspect.signature(original).parameters)
    if parameters[:2] != ["self", "save_directory"] or "is_main_process" not in parameters:
        raise RuntimeError(
            "peft.PeftModel.save_pretrained no longer takes (save_directory, ..., is_main_process=...); "
            "peft_ctrl/_registry.py must be updated for this peft release."
        )

    @functools.wraps(original)
    def save_pretrained(self: PeftModel, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("is_main_process", True) or os.path.isfile(save_directory) or not holds_own_adapter(self):
            return original(self, save_directory, *args, **kwargs)
        with atomic_directory(save_directory, keep=("README.md",)) as tmp:
            original(self, str(tmp), *args, **kwargs)

    save_pretrained._peft_ctrl_atomic = True
    PeftModel.save_pretrained = save_pretrained


class StrictLoadMixin:
    """Refuses an adapter checkpoint whose adapter tensors do not match the model's exactly.

    Put it before ``BaseTuner`` in a tuner's bases and set ``method_name``. peft calls
    ``_remap_adapter_state_dict_for_load`` on every load (``PeftModel.from_pretrained``, ``load_adapter``,
    ``set_peft_model_state_dict``); the checkpoint is compared with what ``get_peft_model_state_dict`` would
    save for the adapter. On a mismatch the half-loaded adapter is removed again and a ``ValueError`` lists
    the missing, unexpected and mis-shaped tensors.
    """

    prefix: str
    method_name: str

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: torch.nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        problems = cls._state_problems(model, adapter_name, state_dict)
        if problems:
            _drop_adapter(model, adapter_name)
            listed = "\n  ".join(problems[:12]) + ("\n  ..." if len(problems) > 12 else "")
            raise ValueError(
                f"The {cls.method_name} adapter {adapter_name!r} does not fit this base model ({len(problems)} "
                f"problem(s)):\n  {listed}\nLoad it onto the base model it was trained with (same architecture "
                "and sizes) with the config saved beside it. The model was left without this adapter."
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _state_problems(
        cls, model: torch.nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> list[str]:
        marker = "." + cls.prefix
        expected = {
            k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items() if marker in k
        }
        given = {k: v for k, v in state_dict.items() if marker in k}
        problems = [f"{k}: missing from the checkpoint" for k in expected if k not in given]
        problems += [
            f"{k}: in the checkpoint, but this model has no such adapter tensor" for k in given if k not in expected
        ]
        problems += [
            f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if k in given and tuple(given[k].shape) != tuple(v.shape)
        ]
        return problems


def _drop_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Undo a half-loaded adapter so a failed load leaves the model as it was."""
    tuner = getattr(model, "base_model", model)
    configs = getattr(tuner, "peft_config", {})
    if adapter_name not in configs:
        return
    if list(configs) == [adapter_name]:
        tuner.unload()
    else:
        tuner.delete_adapter(adapter_name)


# ---------------------------------------------------------------- small wrappers over peft internals
# Each is used by the methods instead of the private name itself; tests/test_registry.py exercises each one.


def matches_target(key: str, target: str, config: Any) -> bool:
    """Whether module ``key`` is ``target`` (a name or path suffix) under ``config``'s ``layers_to_transform``,
    ``layers_pattern`` and ``modules_to_save`` filters, decided by peft's own matcher."""
    matcher = SimpleNamespace(
        target_modules=[target],
        target_parameters=None,
        exclude_modules=None,
        modules_to_save=getattr(config, "modules_to_save", None),
        layers_to_transform=getattr(config, "layers_to_transform", None),
        layers_pattern=getattr(config, "layers_pattern", None),
    )
    return bool(check_target_module_exists(matcher, key))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Every adapter layer in ``model`` runs its base layer only, as under ``PeftModel.disable_adapter()``, without
    touching ``requires_grad``; restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m._disable_adapters = value


def set_active_adapter(layer: BaseTunerLayer, adapter: str | list[str]) -> None:
    """Set a freshly built layer's active adapter(s) before it is attached (what peft's layers do in __init__)."""
    layer._active_adapter = adapter


def move_adapter_to_base_device(layer: BaseTunerLayer, adapter: str) -> None:
    """Put ``adapter``'s weights on the base layer's device and float dtype (skipped for meta tensors)."""
    layer._move_adapter_to_device_of_base_layer(adapter)


def lora_uses_variant(layer: Any, adapter: str) -> bool:
    """Whether a peft LoRA layer runs ``adapter`` through a variant (DoRA and others) instead of plain LoRA."""
    return adapter in layer.lora_variant


def cast_lora_input(layer: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast the way a peft LoRA layer casts its input for the adapter weights (respects autocast)."""
    return layer._cast_input_dtype(x, dtype)
