"""The placement probe: bridges found and checked on the model itself, the wrong placements of the issue refused
with what the head reads and the right placement, and the small config errors."""

import time

import pytest
import torch
import transformers
from models import build
from peft import get_peft_model
from zoo import adapt, bridges, tiny, tiny_config

from peft_ctrl import StateCtrlConfig
from peft_ctrl.state_ctrl import find_bridges


def test_qwen2_moe_state_width_comes_from_the_tensors():
    """Following the old error message on Qwen2-MoE gave B of shape (1, r): the width was read from the last
    nn.Linear in the tail (shared_expert_gate, 64 -> 1). It is now the probed state's width."""
    model, _ = adapt("qwen2_moe", bridges=[("post_attention_layernorm", "mlp")])
    for layer in bridges(model):
        assert layer.state_ctrl_B["default"].weight.shape == (64, 4)
        assert layer.state_ctrl_A["default"].weight.shape == (4, 64)


def test_gemma2_llama_placement_is_refused_and_the_right_one_is_found():
    """Gemma2's sandwich norms: LLaMA's ('post_attention_layernorm', 'mlp') reads the attention branch and puts the
    control through post_feedforward_layernorm. Refused, naming the norm and the right bridges; the right placement
    is what the probe finds by itself."""
    with pytest.raises(ValueError, match=r"'mlp' returns passes through 'post_feedforward_layernorm'") as err:
        adapt("gemma2", bridges=[("post_attention_layernorm", "mlp")])
    assert "('pre_feedforward_layernorm', 'post_feedforward_layernorm') [mlp]" in str(err.value)
    with pytest.raises(ValueError, match=r"reads the output of 'self_attn'.*Use \('input_layernorm'"):
        adapt("gemma2", bridges=[("post_attention_layernorm", "post_attention_layernorm")])
    found, _ = adapt("gemma2")
    assert {layer.head_name["default"].rpartition(".")[2] for layer in bridges(found)} == {"pre_feedforward_layernorm"}
    given, _ = adapt("gemma2", bridges=[("pre_feedforward_layernorm", "post_feedforward_layernorm")])
    assert len(bridges(given)) == 2


def test_a_head_that_skips_a_sub_block_is_refused():
    """LLaMA ('input_layernorm', 'mlp'): the head reads the block input, not the state entering the MLP."""
    with pytest.raises(ValueError, match=r"reads the block's input state.*\('post_attention_layernorm', 'mlp'\)"):
        get_peft_model(build("llama"), StateCtrlConfig(r=4, bridges=[("input_layernorm", "mlp")]))


def test_a_tail_inside_the_branch_is_refused():
    """LLaMA ('post_attention_layernorm', 'mlp.up_proj'): up_proj's output goes on through the MLP."""
    with pytest.raises(ValueError, match=r"'mlp.up_proj' returns is changed by an operation outside any module"):
        get_peft_model(build("llama"), StateCtrlConfig(r=4, bridges=[("post_attention_layernorm", "mlp.up_proj")]))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_moe_blocks_are_bridged_whole(family):
    """Transformers 5 MoE blocks hold a router and fused experts (no nn.Linear to read a width from): the bridge
    spans the whole block, router included."""
    model, _ = adapt(family)
    tails = {type(layer.base_layer).__name__ for layer in bridges(model)}
    assert all("Moe" in t or "MoE" in t or "Sparse" in t or t.endswith("MLP") for t in tails), tails
    assert all(layer.out_features == 64 for layer in bridges(model))


def test_post_norm_tails_that_are_norms_are_accepted():
    """DistilBERT's post-norm: the LayerNorm after each sub-block is the tail (out = LN(h + F(h)) + B A h)."""
    model, _ = adapt("distilbert", bridges=[("ffn", "output_layer_norm")])
    assert len(bridges(model)) == 2
    found, _ = adapt("distilbert", blocks="both")
    assert {layer.base_layer.__class__.__name__ for layer in bridges(found)} == {"LayerNorm"}


def test_control_lora_takes_bridges():
    base, _ = tiny("llama")
    model = get_peft_model(
        base, StateCtrlConfig.control_lora(r=4, lora_r=2, bridges=[("post_attention_layernorm", "mlp")])
    )
    assert len(bridges(model)) == 2
    assert any("q_proj" in n and "state_ctrl_lora_A" in n for n, _ in model.named_parameters())


def test_a_rank_above_the_state_width_is_a_warning():
    """It trains correctly (B A just cannot use the extra rank), and recipes are shared across model sizes, so it
    warns rather than refuses."""
    with pytest.warns(UserWarning, match=r"r=128\) is above the state width 64.*r <= 64 trains the same"):
        model, _ = adapt("llama", r=128)
    assert bridges(model)[0].state_ctrl_A["default"].weight.shape == (128, 64)


def test_layers_beyond_the_model_are_an_error():
    with pytest.raises(ValueError, match=r"layer indices \[5\].*at most 2 blocks"):
        adapt("llama", layers_to_transform=[1, 5])
    with pytest.raises(ValueError, match="layers_pattern='blocks' names none"):
        adapt("llama", layers_to_transform=[1], layers_pattern="blocks")
    model, _ = adapt("llama", layers_to_transform=[1], blocks="both")
    assert {layer.head_name["default"].split(".")[2] for layer in bridges(model)} == {"1"}


def test_bare_vit_model_needs_no_layers_pattern():
    """A bare ViTModel keeps its block list at the top level (``layers``): layer indices work without
    layers_pattern."""
    model = get_peft_model(transformers.ViTModel(tiny_config("vit")), StateCtrlConfig(r=4, layers_to_transform=[0]))
    assert len(bridges(model)) == 1


def test_encoder_decoders_bridge_both_stacks_and_cross_attention():
    model, _ = adapt("t5", blocks="attn")
    heads = sorted(layer.head_name["default"] for layer in bridges(model))
    assert sum(h.startswith("encoder.") for h in heads) == 2 and sum(h.startswith("decoder.") for h in heads) == 4
    subs = find_bridges(tiny("bart")[0], blocks="both")
    assert [s.kind for s in subs["model.decoder.layers.0"]] == ["attn", "cross", "mlp"]
    assert all(s.form == "post-norm" for s in subs["model.decoder.layers.0"])


def test_skipping_the_probe_needs_bridges_and_works_on_the_meta_device():
    with pytest.raises(ValueError, match="check_placement=False skips the probe that finds the bridges"):
        adapt("llama", check_placement=False)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(tiny_config("llama"))
    with pytest.raises(ValueError, match="not materialised.*check_placement=False"):
        get_peft_model(meta, StateCtrlConfig(r=4))
    bridged = [("post_attention_layernorm", "mlp")]
    model = get_peft_model(meta, StateCtrlConfig(r=4, bridges=bridged, check_placement=False))
    assert [layer.in_features for layer in bridges(model)] == [64, 64]


def test_a_model_without_a_probe_input_is_checked_on_its_first_forward():
    """A plain torch model has no config to build probe tokens from: its bridges are checked on the first
    forward call (with that call's arguments), and a wrong one stops that call."""
    model = get_peft_model(build("custom"), StateCtrlConfig(r=4, bridges=[("norm", "ff.0")], init_weights=False))
    with pytest.raises(ValueError, match=r"'ff.0' returns passes through 'ff.1'|not a residual sub-block"):
        model(x=torch.randn(2, 3, 16))


def test_the_probe_runs_one_block():
    """get_peft_model runs the model only up to the end of the first block (the probe stops there)."""
    base, _ = tiny("llama")
    runs = []
    base.model.layers[1].register_forward_pre_hook(lambda *a: runs.append(1))
    start = time.perf_counter()
    get_peft_model(base, StateCtrlConfig(r=4, blocks="both"))
    assert runs == [] and time.perf_counter() - start < 5
