"""The one place where peft-ctrl touches peft internals.

Upstream ``peft.utils.register_peft_method`` only accepts names that are already members of the
``PeftType`` enum, so a plugin cannot use it on its own. ``register`` first adds the member to
``PeftType`` (the enum stays a ``str`` enum: ``PeftType("STATE_CTRL")``, iteration and JSON
round-trips work like for built-in members), then calls the public ``register_peft_method``.

``tests/test_registry.py`` checks every assumption made here, so a peft release that changes them
fails loudly in CI instead of silently mis-registering a method.
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


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
