#!/usr/bin/env bash
# The two commands of the README's quick start, each setting everything up first:
#   bash run.sh demo    pretrain on the bundled sample volumes (a few minutes on CPU), then scramble and solve one
#   bash run.sh test    the test suite (what CI runs)
# Extra arguments go to the demo (e.g. --steps 300) or to pytest (e.g. -k puzzle).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${RUBIKSSL_VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {  # setup EXTRAS: the project and its optional extras (none for the demo; the test lane's for the tests)
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.rubikssl-installed-${1:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        # The CPU wheel first, so that the unpinned torch>=2.3 of the project is already satisfied.
        "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
        # ...and kept: an extra's dependency (nnU-Net's timm -> torchvision) must not swap it for another build.
        "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/torch-constraint.txt"
        "$VENV/bin/python" -m pip install --quiet -e ".${1:+[$1]}" -c "$VENV/torch-constraint.txt"
        touch "$stamp"
    fi
}

command=${1:-}
shift || true
case "$command" in
    demo) setup; exec "$VENV/bin/rubikssl" demo "$@" ;;
    # One pytest-xdist worker per core (conftest.py gives each its share of threads); -n 0 runs in one process.
    test) setup "test,nnunet"; exec "$VENV/bin/python" -m pytest -q -n auto --dist loadgroup "$@" ;;
    *) echo "usage: bash run.sh demo|test [arguments]" >&2; exit 2 ;;
esac
