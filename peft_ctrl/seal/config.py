from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

from peft_ctrl._checks import check_bool, check_float, check_int, check_probability

from .keys import check_commitment, commitment, deepcopy_in_memory, new_salt, resolve_key


@dataclass
class SealConfig(PeftConfig):
    """Configuration of SEAL passport watermarks for LoRA (docs/seal.md).

    Each target ``nn.Linear`` gets ``h = W x + s * B C A x`` with trainable LoRA factors B (out x r, zero at
    start) and A (r x in, drawn from the key), a frozen r x r passport C drawn from the key, and
    ``s = lora_alpha / r``. Release with ``peft_ctrl.seal.release`` as a plain LoRA adapter.

    Args:
        r (`int`): LoRA rank.
        lora_alpha (`float`): LoRA scaling numerator, ``s = lora_alpha / r``.
        lora_dropout (`float`): Dropout on the adapter input.
        target_modules (`list[str] | str`, *optional*): Modules to adapt (names or a regex), as in LoRA; the
            LoRA defaults of the architecture when unset.
        layers_to_transform (`int | list[int]`, *optional*): Only adapt layers with these indices.
        layers_pattern (`str | list[str]`, *optional*): Name of the layer list used with ``layers_to_transform``.
        modules_to_save (`list[str]`, *optional*): Extra modules (e.g. a classifier head) trained and saved in full.
        init_weights (`bool`): ``True`` (default): B = 0, so the model starts as the base model. ``False``: B
            random as well (for tests).
        init_a_scale (`float`): Multiplies the key-derived initial A (LoRA's default variance at 1). Adam's steps
            have a fixed size, so a larger A turns less under training: the owner's and an attacker's continued
            fine-tuning leave its row space closer to the key's (docs/seal.md, "Continued fine-tuning"), while A
            adapts more slowly (with ``lora_alpha`` divided by the same factor, exactly as LoRA with A's learning
            rate divided by it).
        commitment (`str`, *optional*): Public SHA-256 commitment to the key, filled when the model is built.
        salt (`str`, *optional*): Random salt of the commitment, filled with it.
        schedule (`str`, *optional*): SHA-256 of the adapter's structure (every adapted module's name, shape and
            rank; ``keys.key_schedule``), filled when the model is built. Every key-derived tensor depends on it;
            a saved adapter only loads onto a model that gives the same structure.
        key (`str | bytes`, *optional*, init only): The owner's secret key; defaults to the environment variable
            ``PEFT_CTRL_SEAL_KEY``. Never saved: not a field, so not in ``adapter_config.json`` or ``repr``.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "nn.Linear modules to adapt (names or a regex); LoRA's defaults for the model if unset."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. a classifier head) trained and saved in full."}
    )
    init_weights: bool = field(default=True, metadata={"help": "B = 0 at start (True) or random (False, for tests)."})
    init_a_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies the key-derived initial A: larger keeps A's row space nearer the key's under further "
            "training (the owner's and an attacker's), at a slower start."
        },
    )
    commitment: str | None = field(
        default=None, metadata={"help": "Public SHA-256 commitment to the owner's key (filled automatically)."}
    )
    salt: str | None = field(default=None, metadata={"help": "Salt of the commitment (filled automatically)."})
    schedule: str | None = field(
        default=None,
        metadata={
            "help": "SHA-256 of the adapter's structure, on which key-derived tensors depend (filled automatically)."
        },
    )
    key: InitVar[str | bytes | None] = None

    def __post_init__(self, key: str | bytes | None) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SEAL
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        check_int("SealConfig.r", self.r, low=1)
        self.lora_alpha = check_float("SealConfig.lora_alpha", self.lora_alpha, 0.0, low_open=True)
        self.lora_dropout = check_probability("SealConfig.lora_dropout", self.lora_dropout)
        check_bool("SealConfig.init_weights", self.init_weights)
        self.init_a_scale = check_float("SealConfig.init_a_scale", self.init_a_scale, 0.0, low_open=True)
        if (self.commitment is None) != (self.salt is None):
            raise ValueError("SealConfig needs both commitment and salt, or neither (they are filled together).")
        self._key = resolve_key(key) if key is not None else None

    def __getstate__(self) -> dict:
        """Pickling (``torch.save``, multiprocessing) never writes the key: the copy resolves it from
        ``PEFT_CTRL_SEAL_KEY`` when it needs it. ``copy.deepcopy`` keeps it (``__deepcopy__``)."""
        return {**self.__dict__, "_key": None}

    def __deepcopy__(self, memo: dict) -> SealConfig:
        return deepcopy_in_memory(self, memo)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def secret_key(self) -> bytes:
        """The owner's key (argument, else environment), checked against the commitment; the first call on
        a fresh config fills in the commitment and its salt."""
        key = self._key if self._key is not None else resolve_key(None)
        if self.commitment is None:
            self.salt = new_salt()
            self.commitment = commitment(key, self.salt)
        else:
            check_commitment(key, self.commitment, self.salt, "this SealConfig")
        return key
