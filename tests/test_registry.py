"""The registration workaround in peft_ctrl/_registry.py, and the peft behaviour it relies on."""

import importlib
import json

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

import peft_ctrl
from peft_ctrl import _registry
from peft_ctrl.seal import SealConfig, SealModel
from peft_ctrl.state_ctrl import StateCtrlConfig, StateCtrlModel


def test_upstream_still_rejects_unknown_names():
    # If this starts failing, peft accepts plugin names by itself and _registry.py can be simplified.
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="not_a_method_xyz", config_cls=StateCtrlConfig, model_cls=StateCtrlModel)


@pytest.mark.parametrize(
    ("name", "config_cls", "model_cls", "prefix"),
    [("STATE_CTRL", StateCtrlConfig, StateCtrlModel, "state_ctrl_"), ("SEAL", SealConfig, SealModel, "seal_")],
)
def test_methods_are_real_enum_members(name, config_cls, model_cls, prefix):
    member = PeftType[name]
    assert member is PeftType(name)
    assert member == name and isinstance(member, str)
    assert member in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix
    # Built-in members are untouched.
    assert PeftType("LORA") is PeftType.LORA


def test_registration_is_idempotent():
    before = list(PeftType)
    importlib.reload(importlib.import_module("peft_ctrl.state_ctrl"))
    importlib.reload(peft_ctrl)
    assert list(PeftType) == before
    assert _registry.add_peft_type("STATE_CTRL") is PeftType.STATE_CTRL


def test_a_different_class_under_a_taken_name_is_refused():
    class Other(PeftConfig):
        pass

    with pytest.raises(ValueError, match="already registered"):
        _registry.register("state_ctrl", config_cls=Other, model_cls=StateCtrlModel, prefix="state_ctrl_")


def test_bad_type_name():
    with pytest.raises(ValueError, match="upper-case"):
        _registry.add_peft_type("lower")


def test_config_round_trips_through_json(tmp_path):
    config = StateCtrlConfig(r=8, bridges=[("ln", "ff")], layers_to_transform=[0, 2])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "STATE_CTRL" and "target_modules" not in saved
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, StateCtrlConfig)
    assert loaded.bridges == [("ln", "ff")] and loaded.r == 8 and loaded.layers_to_transform == [0, 2]


# ---------------------------------------------------------------- the wrappers over peft internals


def test_matches_target_applies_peft_layer_filters():
    config = StateCtrlConfig(r=2, layers_to_transform=[1])
    assert _registry.matches_target("model.layers.1.mlp", "mlp", config)
    assert not _registry.matches_target("model.layers.0.mlp", "mlp", config)
    assert not _registry.matches_target("model.layers.1.self_attn", "mlp", config)


def test_layer_wrappers_reach_the_peft_attributes_they_name():
    import torch
    from models import build
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    layer = next(m for m in lora.modules() if isinstance(m, LoraLinear))
    assert not _registry.lora_uses_variant(layer, "default")
    dora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert _registry.lora_uses_variant(next(m for m in dora.modules() if isinstance(m, LoraLinear)), "default")
    x = torch.ones(2, 32, dtype=torch.float64)
    assert _registry.cast_lora_input(layer, x, torch.float32).dtype == torch.float32

    _registry.set_active_adapter(layer, "other")
    assert layer.active_adapters == ["other"]
    _registry.set_active_adapter(layer, "default")
    layer.lora_A["default"].to(torch.float64)
    _registry.move_adapter_to_base_device(layer, "default")
    assert layer.lora_A["default"].weight.dtype == layer.base_layer.weight.dtype == torch.float32


def test_save_pretrained_is_wrapped_once_and_only_for_our_adapters(tmp_path):
    from models import build
    from peft import LoraConfig, PeftModel, get_peft_model

    assert PeftModel.save_pretrained._peft_ctrl_atomic
    _registry.install_atomic_save()  # idempotent: no second wrapper
    assert not getattr(PeftModel.save_pretrained.__wrapped__, "_peft_ctrl_atomic", False)
    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    ours = get_peft_model(build("llama"), StateCtrlConfig(r=2))
    assert not _registry.holds_own_adapter(lora) and _registry.holds_own_adapter(ours)
