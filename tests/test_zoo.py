"""The state-ctrl battery over every model family people fine-tune (issue: placement found and checked on the
model itself). Each family is a tiny random model built from its transformers config (tests/zoo.py); every check
runs out of the box, with no bridges or table entry given. docs/state_ctrl.md's support table is generated from
the same checks (benchmarks/state_ctrl_zoo.py)."""

import pytest
from zoo import CHECKS, FAMILIES, NO_CONTROL_LORA

WITHOUT_GENERATE = {"bert", "roberta", "xlm-roberta", "deberta-v2", "distilbert", "electra", "modernbert", "vit"}
WITHOUT_GENERATE |= {"dinov2", "whisper"}


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, check):
    if check == "Control+LoRA" and family in NO_CONTROL_LORA:
        with pytest.raises(ValueError, match="adapts torch.nn.Linear modules only"):
            CHECKS[check](family)
        return
    note = CHECKS[check](family)
    if check == "cache generate":
        assert (note is None) == (family in WITHOUT_GENERATE), note
    elif check != "checkpointing":
        assert note is not None


def test_the_zoo_covers_the_families_of_the_issue():
    assert len(FAMILIES) == 46 and len(set(FAMILIES)) == 46
