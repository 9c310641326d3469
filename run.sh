#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing into .venv, then runs a task.
#   bash run.sh finetune [peft-ctrl finetune flags]   the main job (state-ctrl vs PEFT LoRA on MiniLM)
#   bash run.sh test [pytest flags]                    the test suite
#   bash run.sh <any command>                          runs the command inside the environment
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.peft-ctrl-installed"
want="$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] installing into $VENV ..." >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        torch_spec="torch>=2.4"          # a GPU machine: the default (CUDA) build
    else
        torch_spec="torch==2.13.0"       # no GPU: the CPU build (an unpinned torch pulls a multi-GB CUDA build)
    fi
    "$VENV/bin/python" -m pip install -q "$torch_spec" -e ".[dev]"
    echo "$want" > "$STAMP"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# DeepSpeed compiles its CPU ops (shared-memory comm, Adam) once; keep them in the ignored cache folder.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

task="${1:-}"
[ $# -gt 0 ] && shift
case "$task" in
    finetune) exec peft-ctrl finetune "$@" ;;
    test) exec python -m pytest -q "$@" ;;
    "") echo "usage: bash run.sh finetune|test|<command> [args]" >&2; exit 2 ;;
    *) exec "$task" "$@" ;;
esac
