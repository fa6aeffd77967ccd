#!/usr/bin/env bash
# The two commands of the README's quick start, each setting everything up first:
#   bash run.sh demo    pretrain on the bundled sample volumes (a few minutes on CPU), then scramble and solve one
#   bash run.sh test    the test suite (what CI runs)
# Extra arguments go to the demo (e.g. --steps 300) or to pytest (e.g. -k puzzle).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${RUBIKSSL_VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.rubikssl-installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        # The CPU wheel first, so that the unpinned torch>=2.1 of the project is already satisfied.
        "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
        "$VENV/bin/python" -m pip install --quiet -e ".[test]"
        touch "$stamp"
    fi
}

command=${1:-}
shift || true
case "$command" in
    demo) setup; exec "$VENV/bin/rubikssl" demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh demo|test [arguments]" >&2; exit 2 ;;
esac
