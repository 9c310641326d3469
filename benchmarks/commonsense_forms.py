"""Which form of the commonsense questions can SmolLM2-135M answer at all? The base model, no training, on the
validation split (100 items per task, the same questions in every form):

- label: the LLM-Adapters form (the options listed, the response ``the correct answer is answer2``);
- listed: the options listed, the response the option's own words (``commonsense.in_words``);
- cloze: the question alone, the response the option's words (the ``commonsense-cloze`` task).

Each form is scored as ``peft-ctrl bench`` scores it (the words forms through the end-of-turn token). Prints the
table and writes docs/results/commonsense_forms.{json,md,png}; about 3 minutes on 2 CPU cores.

    python benchmarks/commonsense_forms.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from _common import parser, pyplot, save_figure, write_results

from peft_ctrl.models import load_smollm2
from peft_ctrl_app.commonsense import TASKS as SUBTASKS
from peft_ctrl_app.commonsense import read_items, shipped_file, split_validation
from peft_ctrl_app.lm_bench import TASKS, BenchData, evaluate, scored_item

# each form is the bench task that asks it, so the benchmark scores exactly what `peft-ctrl bench TASK` scores
FORMS = {"label": "commonsense", "listed": "commonsense-listed", "cloze": "commonsense-cloze"}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--items", type=int, default=100, help="validation items per task (the bench's default split)")
    args = p.parse_args()
    model, tokenizer = load_smollm2()
    validation = {t: split_validation(read_items(shipped_file(t, "train"), t), args.items)[1] for t in SUBTASKS}
    results = {}
    for form, task in FORMS.items():
        spec = TASKS[task]
        evaluation = {
            t: [scored_item(tokenizer, it, spec.end_of_turn) for it in spec.prepare(items)]
            for t, items in validation.items()
        }
        hits, nll = evaluate(model, BenchData([], evaluation, 0), tokenizer.pad_token_id, bf16=True)
        results[form] = {"accuracy": {t: 100 * statistics.fmean(h) for t, h in hits.items()}, "option_nll": nll}
        print(form, {t: round(a, 1) for t, a in results[form]["accuracy"].items()}, flush=True)
    lines = ["| form | " + " | ".join(SUBTASKS) + " | average |", "|---|" + "---:|" * (len(SUBTASKS) + 1)]
    for form, r in results.items():
        cells = [f"{r['accuracy'][t]:.1f}" for t in SUBTASKS]
        lines.append(f"| {form} | {' | '.join(cells)} | {statistics.fmean(r['accuracy'].values()):.1f} |")
    lines.append(f"| chance | 50.0 | 25.0 | 25.0 | 25.0 | {statistics.fmean([50, 25, 25, 25]):.1f} |")
    table = (
        "SmolLM2-135M-Instruct without fine-tuning, validation split "
        f"({args.items} items per task), accuracy %:\n\n" + "\n".join(lines)
    )

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        width = 0.8 / len(results)
        for i, (form, r) in enumerate(results.items()):
            heights = [r["accuracy"][t] for t in SUBTASKS]
            ax.bar([k + i * width for k in range(len(SUBTASKS))], heights, width, label=form)
        ax.plot([-0.2, 0.6], [50, 50], "k:", [0.8, 3.6], [25, 25], "k:")
        ax.set(xticks=[k + width for k in range(len(SUBTASKS))], xticklabels=SUBTASKS, ylabel="accuracy %")
        ax.set_title("SmolLM2-135M without fine-tuning: the three forms (dotted: chance)", fontsize=9)
        ax.legend(fontsize=8)
        save_figure(fig, path)

    write_results(args.out, "commonsense_forms", table, results, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
