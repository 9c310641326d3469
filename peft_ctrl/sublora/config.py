from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

from peft_ctrl._checks import check_bool, check_choice, check_float, check_int, check_probability

HESSIANS = ("exact", "block", "fisher", "diag")


@dataclass
class SubLoRAConfig(PeftConfig):
    """Configuration of SubLoRA: SVD-form adapters whose ranks are allocated by submodular selection on a
    second-order loss model (docs/sublora.md), run by ``trainer_callbacks.SubLoRACallback``.

    Each target ``nn.Linear`` gets ``delta W = P diag(lambda * mask) Q * lora_alpha / r`` with ``r``
    components; the callback masks components down to the global budget on AdaLoRA's cubic schedule and
    finally truncates the adapter to the kept components (recorded in ``rank_pattern``).

    Args:
        r (`int`): Initial number of components per module.
        target_r (`int`, *optional*): Average kept components per module; the budget is ``target_r`` times the
            number of modules. Give this or ``budget``.
        budget (`int`, *optional*): Total kept components over all modules.
        lora_alpha (`float`): Scale numerator: ``delta W`` is multiplied by ``lora_alpha / r``.
        lora_dropout (`float`): Dropout on the adapter input.
        target_modules (`list[str] | str`): Linear modules to adapt (names or a regex).
        t_init (`int`): Steps of plain training before the first allocation.
        t_final (`int`): Final steps with the allocation frozen.
        delta_t (`int`): Steps between allocations.
        total_step (`int`, *optional*): Training steps; the callback fills it from the Trainer when unset.
        hessian (`str`): Curvature of the loss in lambda: ``"exact"`` (one Hessian-vector product per
            component, batched), ``"block"`` (per-module blocks from random-sign probes), ``"fisher"``
            (empirical Fisher from per-sample gradients) or ``"diag"`` (its diagonal: a modular objective).
        curvature_samples (`int`): Examples drawn for each curvature estimate (one batch is split into this
            many parts for ``"fisher"``/``"diag"``). 16 by default: on the LLaMA-shaped planted benchmark 8 gave
            3x the final loss, 32 no better at about 1.7x the allocation time.
        exact_svd (`bool`): Before each allocation, rewrite every module's kept components as the exact singular
            triplets of its delta W (same outputs), so components are orthogonal and masking removes whole
            triplets; modules that lose components keep that form and restart their optimizer statistics.
            Needs the optimizer (``RankAllocator.allocate(..., optimizer=...)``; the callback passes the
            Trainer's) and is refused under DeepSpeed, whose optimizer state cannot be restarted per
            parameter. Measured in docs/sublora.md: it takes the PINN error below fixed-rank LoRA's and
            recovers the planted ranks on the parallel MLP in every seed.
        orth_reg_weight (`float`): Weight of AdaLoRA's regulariser, the mean of ``|P^T P - I|_F`` and
            ``|Q Q^T - I|_F`` over modules, applied by the callback to the gradients before every optimizer
            step, whatever the model returns. Off by default: ``exact_svd`` makes the components exactly
            orthogonal where it matters (at each selection); at 0.01 the regulariser raised the planted-rank
            benchmark's final loss on every problem (docs/sublora.md), at 0.1 a hundredfold.
        init_weights (`bool`): ``True`` (default): lambda = 0 (AdaLoRA's initialisation), so the adapted model
            starts as the base model. ``False``: lambda drawn from N(0, 1), so the adapter changes the output from
            the start (for tests, as with peft's ``init_lora_weights=False``).
        rank_pattern (`dict[str, int]`, *optional*): Kept components per module after truncation (filled
            automatically; used when loading).
        modules_to_save (`list[str]`, *optional*): Extra modules trained and saved in full.
    """

    r: int = field(default=12, metadata={"help": "Initial number of components per module."})
    target_r: int | None = field(default=None, metadata={"help": "Average kept components per module."})
    budget: int | None = field(default=None, metadata={"help": "Total kept components (instead of target_r)."})
    lora_alpha: float = field(default=12, metadata={"help": "delta W is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Linear modules to adapt (names or a regex)."}
    )
    t_init: int = field(default=0, metadata={"help": "Steps before the first allocation."})
    t_final: int = field(default=0, metadata={"help": "Final steps with the allocation frozen."})
    delta_t: int = field(default=10, metadata={"help": "Steps between allocations."})
    total_step: int | None = field(default=None, metadata={"help": "Training steps (filled from the Trainer)."})
    hessian: Literal["exact", "block", "fisher", "diag"] = field(
        default="block", metadata={"help": "Curvature estimate: exact, block, fisher or diag."}
    )
    curvature_samples: int = field(default=16, metadata={"help": "Examples per curvature estimate."})
    exact_svd: bool = field(
        default=True, metadata={"help": "Rewrite kept components as exact singular triplets at each allocation."}
    )
    orth_reg_weight: float = field(default=0.0, metadata={"help": "Weight of the orthogonality regulariser."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: lambda = 0, so the model starts as the base model. False: random lambda (tests)."},
    )
    rank_pattern: dict[str, int] | None = field(
        default=None, metadata={"help": "Kept components per module after truncation (filled automatically)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SUBLORA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        check_int("SubLoRAConfig.r", self.r, low=1)
        if (self.target_r is None) == (self.budget is None):
            raise ValueError("Give exactly one of target_r (kept components per module) or budget (total).")
        if self.target_r is not None:
            check_int("SubLoRAConfig.target_r", self.target_r, low=1, high=self.r)
        if self.budget is not None:
            check_int("SubLoRAConfig.budget", self.budget, low=1)
        self.lora_alpha = check_float("SubLoRAConfig.lora_alpha", self.lora_alpha, 0.0, low_open=True)
        self.lora_dropout = check_probability("SubLoRAConfig.lora_dropout", self.lora_dropout)
        check_choice("SubLoRAConfig.hessian", self.hessian, HESSIANS)
        check_int("SubLoRAConfig.t_init", self.t_init, low=0)
        check_int("SubLoRAConfig.t_final", self.t_final, low=0)
        check_int("SubLoRAConfig.delta_t", self.delta_t, low=1)
        check_int("SubLoRAConfig.curvature_samples", self.curvature_samples, low=1)
        if self.total_step is not None:
            check_int("SubLoRAConfig.total_step", self.total_step, low=1)
        check_bool("SubLoRAConfig.exact_svd", self.exact_svd)
        check_bool("SubLoRAConfig.init_weights", self.init_weights)
        self.orth_reg_weight = check_float("SubLoRAConfig.orth_reg_weight", self.orth_reg_weight, 0.0)
        for module, rank in (self.rank_pattern or {}).items():
            check_int(f"SubLoRAConfig.rank_pattern[{module!r}]", rank, low=0, high=self.r)
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    def check_schedule(self, total_step: int) -> None:
        if self.t_init + self.t_final >= total_step:
            raise ValueError(
                f"t_init ({self.t_init}) + t_final ({self.t_final}) must be smaller than total_step ({total_step}): "
                "the budget needs steps to decrease. Shorten the warm-up/final phases or train longer."
            )

    def total_budget(self, modules: int) -> int:
        """The number of components kept at the end, checked against ``modules * r``."""
        total = self.budget if self.budget is not None else self.target_r * modules
        if total > modules * self.r:
            raise ValueError(
                f"budget {total} exceeds the {modules * self.r} components of {modules} modules x r={self.r}; "
                "lower it or raise r."
            )
        return total
