# Sourced by the launch scripts: when `torchrun` is not on PATH (scripts/install.sh's .venv is not active),
# use the project's .venv/bin, so a script works as pasted right after `bash scripts/install.sh`.
if ! command -v torchrun > /dev/null 2>&1; then
    PROJECT_VENV_BIN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
    if [[ ! -x "$PROJECT_VENV_BIN/torchrun" ]]; then
        echo "torchrun not found on PATH nor in $PROJECT_VENV_BIN: run 'bash scripts/install.sh' first" \
             "(or activate the environment echo-megatron is installed in)" >&2
        exit 1
    fi
    PATH="$PROJECT_VENV_BIN:$PATH"
fi
