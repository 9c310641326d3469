"""``plan()``: the memory of one training step, from the real model's forward and backward on the meta device.

The model is built from its config on the meta device (no weights are allocated), the method's adapter is applied
with peft as a user would, and one forward and backward runs on meta inputs of the planned batch and length, with
``SavedTensorMeter`` counting every storage autograd saves (views and re-saves once) and the attention kernel of
the target device modelled by ``kernels.attention_like`` (dtype "autocast": fake CPU tensors under bf16 autocast,
``autocast``). Weights, gradients and optimizer state are the bytes of the model's parameters (with the
quantisation state of nf4 weights), of its trainable parameters and of AdamW's two moments (in the parameters'
dtype, as ``torch.optim.AdamW`` keeps them), divided across ranks as the ZeRO stage shards them. The peak is their
sum with the saved activations: what is alive when the backward starts, with the gradients counted as if already
allocated (an upper bound of the step's live bytes; the CUDA context and allocator slack are not in it).

State-ctrl finds its bridges with a probe forward that needs real values; here the probe runs on a tiny twin of
the model (the same config with small sizes and two layers, random weights), and the bridges and LoRA targets it
finds are given to the meta model with ``check_placement=False``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..metrics import SavedTensorMeter
from .autocast import AUTOCAST_DTYPE, cuda_float32_ops, to_fake_cpu
from .configs import load_config
from .kernels import TARGETS, attention_function, cuda_dropout
from .quantized import quantize_nf4, weight_bytes

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
# method -> what it trains; the adapters are the commonsense benchmark's rows (peft_ctrl_app.lm_bench).
METHODS = {
    "lora-all": "PEFT LoRA r=16 on all seven linears of each block",
    "lora-qv": "PEFT LoRA r=16 on q_proj, v_proj",
    "dora": "PEFT DoRA r=16 on all seven linears",
    "lora-all-ckpt": "PEFT LoRA r=16 all-linear with gradient checkpointing",
    "state-ctrl-mlp": "state-ctrl r=64, one bridge per MLP sub-block",
    "state-ctrl-both": "state-ctrl r=32, bridges on attention and MLP sub-blocks",
    "control-lora": "Control+LoRA: MLP bridges r=64 and LoRA r=32 on the attention inputs",
    "full": "full fine-tuning, every parameter trained",
    "qlora": "QLoRA: PEFT LoRA r=16 on all seven linears over an nf4 base (double quantisation)",
    "qlora-ckpt": "QLoRA with gradient checkpointing (prepare_model_for_kbit_training's default)",
    "qcontrol": "QControl: Control+LoRA over the same nf4 base",
}
CHECKPOINTED = ("lora-all-ckpt", "qlora-ckpt")
# Over an nf4 base prepared as peft's QLoRA recipe prepares it (planner.quantized)
QUANTIZED = {"qlora": "lora-all", "qlora-ckpt": "lora-all", "qcontrol": "control-lora"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "autocast": torch.float32}
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Plan:
    """One training step's memory, in bytes per rank (see the module docstring)."""

    model: str
    method: str
    dtype: str
    batch: int
    seq: int
    target: str
    checkpointing: bool
    zero_stage: int
    world_size: int
    parameters: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    saved: int
    logits: int  # of saved: storages saved through vocabulary-sized tensors (logits, the loss's float copies)

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.saved

    def fits(self, gpu_bytes: int) -> bool:
        return self.peak <= gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak": self.peak}


def _check(method: str, dtype: str, batch: int, seq: int, target: str, zero_stage: int, world_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {target!r}.")
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}; got {zero_stage!r}.")
    for name, value in (("batch", batch), ("seq", seq), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _twin(config: Any) -> Any:
    """The same config at tiny sizes (hidden 64, two layers, a small vocabulary): the probe's model."""
    twin = copy.deepcopy(config)
    heads = 4
    kv = heads if getattr(config, "num_key_value_heads", None) in (None, config.num_attention_heads) else 2
    for name, value in {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": 16,
        "vocab_size": 128,
        "query_pre_attn_scalar": 16,
    }.items():
        if hasattr(twin, name):
            setattr(twin, name, value)
    if hasattr(twin, "layer_types") and twin.layer_types is not None:
        twin.layer_types = list(twin.layer_types[:2])
    return twin


def _state_ctrl_config(config: Any, method: str) -> Any:
    """The method's StateCtrlConfig with the bridges (and LoRA targets) the probe finds on the tiny twin."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ..state_ctrl import StateCtrlConfig, StateCtrlLoraLayer, find_bridges

    twin = AutoModelForCausalLM.from_config(_twin(config))
    blocks = "both" if method == "state-ctrl-both" else "mlp"
    found = find_bridges(twin, blocks)
    bridges = sorted({(s.head, s.tail) for subs in found.values() for s in subs})
    if method != "control-lora":
        r = 32 if method == "state-ctrl-both" else 64
        return StateCtrlConfig(r=r, bridges=bridges, check_placement=False)
    twin = get_peft_model(twin, StateCtrlConfig.control_lora())
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in twin.named_modules() if isinstance(m, StateCtrlLoraLayer)})
    return StateCtrlConfig.control_lora(bridges=bridges, lora_target_modules=targets, check_placement=False)


def _adapter(config: Any, method: str) -> Any:
    from peft import LoraConfig

    method = QUANTIZED.get(method, method)
    if method in ("lora-all", "lora-all-ckpt"):
        return LoraConfig(target_modules=ALL_LINEAR, **LORA)
    if method == "lora-qv":
        return LoraConfig(target_modules=["q_proj", "v_proj"], **LORA)
    if method == "dora":
        return LoraConfig(target_modules=ALL_LINEAR, use_dora=True, **LORA)
    return _state_ctrl_config(config, method)


def build(
    config: Any,
    method: str,
    dtype: str = "bf16",
    checkpointing: bool = False,
    device: str = "meta",
    target: str | None = None,
    fake_mode: Any = None,
) -> nn.Module:
    """The model of ``config`` on ``device`` (meta: no weights) in ``dtype``, with ``method``'s adapter, in training
    mode, running ``target``'s attention kernel and dropout (``kernels``; None: the device's own). On another device
    it has random weights: the tests run the meter on it, beside the plan. With ``fake_mode`` (a
    ``FakeTensorMode``) the meta model's tensors become fake CPU tensors of that mode (``autocast.to_fake_cpu``)
    once it is complete. dtype "autocast" builds the weights in fp32, to train under bf16 autocast. The
    quantised methods hold every linear but the output embedding in nf4, computing in ``dtype`` (bf16 under
    autocast), and prepare the model as peft's QLoRA recipe does (``prepare_model_for_kbit_training``: the weights
    left unquantised in fp32, the base frozen)."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)  # from_config records the attention implementation in the config it is given
    adapter = None if method == "full" else _adapter(config, method)
    with torch.device(device):
        attention = attention_function(target) if target else "sdpa"
        if getattr(config, "attn_logit_softcapping", None):  # Gemma-2: SDPA kernels cannot softcap, so eager
            attention = "eager"
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], attn_implementation=attention)
    if method in QUANTIZED:
        compute = AUTOCAST_DTYPE if dtype == "autocast" else DTYPES[dtype]
        model = prepare_model_for_kbit_training(
            quantize_nf4(model, compute), use_gradient_checkpointing=False, auto_clear_cache=False
        )
    checkpointing = checkpointing or method in CHECKPOINTED
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if adapter is not None:
        if checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, adapter)
    if fake_mode is not None:
        to_fake_cpu(model, fake_mode)
    if target == "cuda":
        cuda_dropout(model)
    return model.train()


def saved_bytes(
    model: nn.Module,
    batch: int,
    seq: int,
    vocab: int,
    dtype: str = "bf16",
    target: str = "cuda",
    fake_mode: Any = None,
) -> tuple[int, int]:
    """(bytes saved for backward, of which in vocabulary-sized tensors) in one forward and backward of ``model``
    on ``batch`` x ``seq`` tokens; under bf16 autocast for dtype "autocast" (with CUDA's float32 list for the cuda
    target, ``autocast.cuda_float32_ops``), in ``fake_mode`` when given."""
    with fake_mode or contextlib.nullcontext():
        device = next(model.parameters()).device
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        autocast = dtype == "autocast"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_unpacked(device, fake_mode is not None))
            if autocast:
                stack.enter_context(torch.autocast(device.type, dtype=AUTOCAST_DTYPE))
            if autocast and target == "cuda":
                stack.enter_context(cuda_float32_ops())
            meter = stack.enter_context(SavedTensorMeter(exclude=model))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return meter.total_bytes, meter.outer_bytes_with_last_dim(vocab)


@contextlib.contextmanager
def _unpacked(device: torch.device, fake: bool) -> Iterator[None]:
    """Without a KV cache (gradient checkpointing turns it off), transformers asks whether the position ids hold
    packed sequences, a question about values that meta and fake tensors cannot answer. The planner's rows are
    single unpadded sequences, so the answer is no (``None``, what the check returns for them on a real device)."""
    if device.type != "meta" and not fake:
        yield
        return
    from transformers import masking_utils

    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def plan(
    model: str | Any,
    method: str,
    *,
    dtype: str = "bf16",
    batch: int = 1,
    seq: int = 2048,
    checkpointing: bool = False,
    zero_stage: int = 0,
    world_size: int = 1,
    target: str = "cuda",
) -> Plan:
    """The memory of one training step of ``method`` on ``model`` (a shipped name such as "llama-3.1-8b", a
    ``config.json`` path, or a transformers config). See the module docstring for what is counted and how."""
    _check(method, dtype, batch, seq, target, zero_stage, world_size)
    config = load_config(model)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if dtype == "autocast" else None
    net = build(config, method, dtype, checkpointing, target=target, fake_mode=fake_mode)
    params = list(net.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = weight_bytes(net)
    grads = sum(p.nbytes for p in trainable)
    optimizer = 2 * grads  # AdamW: exp_avg and exp_avg_sq in each parameter's dtype
    if zero_stage >= 1:
        optimizer //= world_size
    if zero_stage >= 2:
        grads //= world_size
    if zero_stage >= 3:
        weights //= world_size
    saved, logits = saved_bytes(net, batch, seq, config.get_text_config().vocab_size, dtype, target, fake_mode)
    name = model if isinstance(model, str) else getattr(config, "name_or_path", "") or config.model_type
    return Plan(
        model=str(name),
        method=method,
        dtype=dtype,
        batch=batch,
        seq=seq,
        target=target,
        checkpointing=checkpointing or method in CHECKPOINTED,
        zero_stage=zero_stage,
        world_size=world_size,
        parameters=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        saved=saved,
        logits=logits,
    )
