"""Copy the committed benchmark tables from docs/results/ into the docs that quote them.

A doc quotes a table between ``<!-- table:NAME -->`` and ``<!-- /table -->`` lines, where NAME is a key
of ``SOURCES``. Run after a benchmark so the docs never hold numbers that the results files do not.

    python benchmarks/update_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path("docs/results")


def _blocks(path: Path) -> list[str]:
    return [b.strip() for b in path.read_text().split("\n\n") if b.strip()]


def _block_after(path: Path, heading: str) -> str:
    blocks = _blocks(path)
    index = next(i for i, b in enumerate(blocks) if b.startswith(heading))
    return blocks[index + 1]


def _support_columns(table: str) -> str:
    """The support table without its last column (the bridges found), for the README."""
    return "\n".join("|".join(line.split("|")[:-2]) + "|" for line in table.splitlines())


SOURCES = {
    "state_ctrl_zoo": lambda: (RESULTS / "state_ctrl_zoo.md").read_text().strip(),
    "memory_plan": lambda: (RESULTS / "memory_plan.md").read_text().strip(),
    "triton_aot": lambda: (RESULTS / "triton_aot.md").read_text().strip(),
    "seal_renaming": lambda: (RESULTS / "seal_renaming.md").read_text().strip(),
    "trainer_path": lambda: (RESULTS / "trainer_path.md").read_text().strip(),
    "state_ctrl_zoo_support": lambda: _support_columns(_blocks(RESULTS / "state_ctrl_zoo.md")[0]),
    "state_ctrl_memory": lambda: _blocks(RESULTS / "state_ctrl_memory.md")[0],
    "fused": lambda: _block_after(RESULTS / "state_ctrl_memory.md", "Fused low-rank op"),
    "cuda_masks": lambda: _block_after(RESULTS / "state_ctrl_memory.md", "The benchmark shape as a CUDA run"),
    "llama2_7b": lambda: _block_after(RESULTS / "state_ctrl_memory.md", "Projected to LLaMA2-7B"),
    "smollm2_memory": lambda: _blocks(RESULTS / "state_ctrl_memory_smollm2.md")[0],
    "smollm2_projection": lambda: _block_after(RESULTS / "state_ctrl_memory_smollm2.md", "Projection formula"),
    "llama3_8b": lambda: _block_after(RESULTS / "state_ctrl_memory_smollm2.md", "Projected to LLaMA3-8B"),
    "finetune_minilm": lambda: _blocks(RESULTS / "finetune_minilm.md")[1],
    "finetune_stdlib": lambda: _blocks(RESULTS / "finetune_stdlib.md")[1],
    "stdlib_grid": lambda: _blocks(RESULTS / "stdlib_grid.md")[1],
    "lowrank_kernels_cpu": lambda: "\n\n".join(_blocks(RESULTS / "lowrank_kernels_cpu.md")),
    "odelora_sensing": lambda: (RESULTS / "odelora_sensing.md").read_text().strip(),
    "odelora_sensing_bounds": lambda: (RESULTS / "odelora_sensing_bounds.md").read_text().strip(),
    "odelora_pinn": lambda: (RESULTS / "odelora_pinn.md").read_text().strip(),
    "sublora_planted": lambda: (RESULTS / "sublora_planted.md").read_text().strip(),
    "sublora_pinn": lambda: (RESULTS / "sublora_pinn.md").read_text().strip(),
    "sublora_pinn_unpruned": lambda: (RESULTS / "sublora_pinn_unpruned" / "sublora_pinn.md").read_text().strip(),
    "seal_robustness": lambda: (RESULTS / "seal_robustness.md").read_text().strip(),
    "seal_finetune_attack": lambda: (RESULTS / "seal_finetune_attack.md").read_text().strip(),
    "odelora_overhead": lambda: (RESULTS / "odelora_overhead.md").read_text().strip(),
    "commonsense": lambda: _blocks(RESULTS / "commonsense.md")[1],
    "commonsense_grid": lambda: _blocks(RESULTS / "commonsense_grid.md")[1],
    "commonsense_others": lambda: _blocks(RESULTS / "commonsense_others.md")[1],
    "commonsense_grid_odelora": lambda: _blocks(RESULTS / "commonsense_grid_odelora.md")[1],
    "commonsense_cloze": lambda: _blocks(RESULTS / "commonsense_cloze.md")[1],
    "commonsense_cloze_grid": lambda: _blocks(RESULTS / "commonsense_cloze_grid.md")[1],
    "commonsense_cloze_others": lambda: _blocks(RESULTS / "commonsense_cloze_others.md")[1],
    "commonsense_forms": lambda: _blocks(RESULTS / "commonsense_forms.md")[1],
    "commonsense_listed_grid": lambda: _blocks(RESULTS / "commonsense_listed_grid.md")[1],
    "quantized_bases": lambda: _blocks(RESULTS / "quantized_bases.md")[1],
    "quantized_compile": lambda: _block_after(RESULTS / "quantized_bases.md", "torch.compile"),
    "zero_memory": lambda: _block_after(RESULTS / "zero_memory.md", "Measured with"),
    "zero_memory_7b": lambda: _block_after(RESULTS / "zero_memory.md", "Projected to LLaMA2-7B"),
}
PATTERN = re.compile(r"(<!-- table:(\w+) -->\n).*?\n?(^<!-- /table -->)", re.S | re.M)


def main() -> None:
    for doc in [Path("README.md"), *Path("docs").glob("*.md")]:
        text = doc.read_text()
        new = PATTERN.sub(lambda m: m.group(1) + SOURCES[m.group(2)]() + "\n" + m.group(3), text)
        if new != text:
            doc.write_text(new)
            print(f"updated {doc}")


if __name__ == "__main__":
    main()
