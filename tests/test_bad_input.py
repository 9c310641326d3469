"""Every config field and command-line flag is checked up front, with a message that names it and its range.

The tables below are the reference list of bad inputs and their messages (docs/compatibility.md quotes them).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from peft_ctrl import SealConfig, StateCtrlConfig, SubLoRAConfig
from peft_ctrl_app import cli
from peft_ctrl_app.finetune import FinetuneArgs

SUB = {"target_modules": ["q_proj"], "target_r": 2}

CONFIG_CASES = [
    (StateCtrlConfig, {"r": 0}, "StateCtrlConfig.r must be an integer >= 1, got 0."),
    (StateCtrlConfig, {"r": 2.5}, "StateCtrlConfig.r must be an integer >= 1, got 2.5."),
    (StateCtrlConfig, {"r": "8"}, "StateCtrlConfig.r must be an integer >= 1, got '8'."),
    (StateCtrlConfig, {"r": True}, "StateCtrlConfig.r must be an integer >= 1, got True."),
    (StateCtrlConfig, {"dropout": 1.0}, "StateCtrlConfig.dropout must be a finite number in [0, 1), got 1.0."),
    (StateCtrlConfig, {"alpha": float("inf")}, "StateCtrlConfig.alpha must be a finite number, got inf."),
    (StateCtrlConfig, {"causal": "yes"}, "StateCtrlConfig.causal must be True or False, got 'yes'."),
    (StateCtrlConfig, {"layers_to_transform": [0, -1]}, "StateCtrlConfig.layers_to_transform must be an integer"),
    (SubLoRAConfig, {**SUB, "r": 2.5}, "SubLoRAConfig.r must be an integer >= 1, got 2.5."),
    (SubLoRAConfig, {**SUB, "target_r": 5, "r": 4}, "SubLoRAConfig.target_r must be an integer in [1, 4], got 5."),
    (SubLoRAConfig, {**SUB, "lora_dropout": 1.5}, "SubLoRAConfig.lora_dropout must be a finite number in [0, 1)"),
    (SubLoRAConfig, {**SUB, "lora_dropout": 1.0}, "SubLoRAConfig.lora_dropout must be a finite number in [0, 1)"),
    (SubLoRAConfig, {**SUB, "lora_alpha": 0}, "SubLoRAConfig.lora_alpha must be a finite number > 0, got 0."),
    (SubLoRAConfig, {**SUB, "delta_t": 0}, "SubLoRAConfig.delta_t must be an integer >= 1, got 0."),
    (SubLoRAConfig, {**SUB, "t_init": -1}, "SubLoRAConfig.t_init must be an integer >= 0, got -1."),
    (SubLoRAConfig, {**SUB, "curvature_samples": 0}, "SubLoRAConfig.curvature_samples must be an integer >= 1"),
    (SubLoRAConfig, {**SUB, "hessian": "full"}, "SubLoRAConfig.hessian must be one of 'exact', 'block'"),
    (SubLoRAConfig, {**SUB, "orth_reg_weight": -0.1}, "SubLoRAConfig.orth_reg_weight must be a finite number >= 0"),
    (SubLoRAConfig, {**SUB, "exact_svd": 1}, "SubLoRAConfig.exact_svd must be True or False, got 1."),
    (SubLoRAConfig, {**SUB, "init_weights": None}, "SubLoRAConfig.init_weights must be True or False, got None."),
    (SealConfig, {"r": "8"}, "SealConfig.r must be an integer >= 1, got '8'."),
    (SealConfig, {"r": 0}, "SealConfig.r must be an integer >= 1, got 0."),
    (SealConfig, {"lora_dropout": 1.0}, "SealConfig.lora_dropout must be a finite number in [0, 1), got 1.0."),
    (SealConfig, {"lora_alpha": float("nan")}, "SealConfig.lora_alpha must be a finite number > 0, got nan."),
]


@pytest.mark.parametrize(("config_cls", "kwargs", "message"), CONFIG_CASES)
def test_config_fields_are_checked_up_front(config_cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        config_cls(**kwargs)
    assert str(err.value).startswith(message)


def test_good_values_pass_and_are_normalised():
    assert SubLoRAConfig(**SUB, lora_alpha=12).lora_alpha == 12.0
    assert SubLoRAConfig(**SUB, init_weights=False).init_weights is False
    assert StateCtrlConfig(dropout=0).dropout == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1, got 0."),
        ({"rank_state_ctrl": 0}, "rank_state_ctrl must be an integer >= 1, got 0."),
        ({"lr": {"lora": -1e-3}}, "lr['lora'] must be a finite number > 0, got -0.001."),
        ({"blocks": "ffn"}, "blocks must be one of 'mlp', 'attn', 'both'; got 'ffn'."),
        ({"seeds": (0, 1.5)}, "seed must be an integer >= 0, got 1.5."),
    ],
)
def test_finetune_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        FinetuneArgs(**kwargs)
    assert str(err.value) == message


CLI_CASES = [
    (["finetune", "--rank-state-ctrl", "0"], "argument --rank-state-ctrl: must be an integer >= 1, got '0'"),
    (["finetune", "--lr-lora", "-0.001"], "argument --lr-lora: must be a finite number > 0, got '-0.001'"),
    (["finetune", "--lr-state-ctrl", "nan"], "argument --lr-state-ctrl: must be a finite number > 0, got 'nan'"),
    (["finetune", "--steps", "2.5"], "argument --steps: must be an integer >= 1, got '2.5'"),
    (["finetune", "--max-length", "3"], "argument --max-length: must be an integer >= 4, got '3'"),
    (["finetune", "--model", "minilm", "--max-length", "8"], "finetune: max_length must be an integer >= 9, got 8."),
    (["finetune", "--step", "3"], "unrecognized arguments: --step (see"),  # no prefix matching
    (["seal", "verify", "x", "--r", "-1"], "argument --r: must be an integer >= 1, got '-1'"),
    (["seal", "verify", "x", "--threshold", "2"], "argument --threshold: must be a finite number in (0, 1), got '2'"),
    (["seal", "attack", "a", "b", "--kind", "noise", "--strength", "-1"], "argument --strength: must be a finite"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_CASES)
def test_cli_errors_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_bad_flag_in_a_real_process_exits_2_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "peft_ctrl_app.cli", "finetune", "--rank-state-ctrl", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "peft-ctrl finetune: error: argument --rank-state-ctrl: must be an integer >= 1, got '0' "
        "(see peft-ctrl finetune --help)"
    )


@pytest.mark.parametrize(
    ("words", "named"),
    [
        (["--key", "hunter2-very-secret-value"], "--key"),
        (["--key=hunter2-very-secret-value"], "--key"),  # one word: the value is attached to the option
        (["-khunter2-very-secret-value"], "-k"),
        (["--token=hunter2-very-secret-value", "--kee=hunter2"], "--token --kee"),
    ],
)
def test_an_unknown_option_never_echoes_its_value(capsys, words, named):
    """A mistyped key option (``--key SECRET``, ``--key=SECRET``, ``-kSECRET``) is not taken as ``--key-file`` (no
    prefix matching); the error names the option and never prints the secret."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["seal", "verify", "suspect", "--mode", "key", *words])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {named} (see" in err and "hunter2" not in err


def test_the_key_option_echo_is_closed_in_a_real_process():
    """The same through the installed entry point, as a user types it (finding 6 of the SEAL issue)."""
    done = subprocess.run(
        [sys.executable, "-m", "peft_ctrl_app.cli", "seal", "verify", "REL", "--mode", "key", "--key=SECRET-xyz"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "SECRET" not in done.stderr + done.stdout
    assert "unrecognized arguments: --key (see" in done.stderr


@pytest.mark.parametrize(
    ("logger_name", "noise"),
    [
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: offline."),
        (
            "kernels._internals.hf_hub",
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode.",
        ),
    ],
)
def test_only_the_two_upstream_import_messages_are_dropped(caplog, logger_name, noise):
    import peft_ctrl  # noqa: F401  (installs the filters)

    upstream = logging.getLogger(logger_name)
    with caplog.at_level(logging.WARNING):
        upstream.warning(noise)
        upstream.warning("Any other warning from the same logger.")
    assert [r.getMessage() for r in caplog.records] == ["Any other warning from the same logger."]
