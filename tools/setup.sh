#!/usr/bin/env bash
# The README's two commands, on a machine with Python and pip and nothing else:
#
#   bash tools/setup.sh demo   install what deltasvd needs, then run its demo (about a minute)
#   bash tools/setup.sh test   install what the tests need too, then run them (what CI runs)
#
# Everything goes into the Python that runs this ($PYTHON, default python3); make and activate
# a venv first to keep it apart. torch is left alone when it is already installed (a CUDA
# build you chose stays); otherwise torch 2.13.0 is installed as the CPU build, never a CUDA
# build unasked (DELTASVD_TORCH=cuda asks for the build PyPI gives, which is CUDA on Linux).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-$(command -v python3 || command -v python)}"
TORCH="2.13.0"
MODE="${1:-}"

say() { echo "setup: $*"; }
reachable() {
    "$PY" -c "import socket, sys; socket.setdefaulttimeout(3)
try:
    socket.create_connection(('$1', 443)).close()
except OSError:
    sys.exit(1)" 2>/dev/null
}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

install_torch() {
    if "$PY" -c "import torch" 2>/dev/null; then
        say "torch $("$PY" -c 'import torch; print(torch.__version__)') is installed: kept"
    elif [[ "${DELTASVD_TORCH:-cpu}" == "cuda" || "$(uname -s)" == "Darwin" ]]; then
        say "installing torch ${TORCH} as PyPI builds it (CUDA on Linux; several GB)"
        pip_install "torch==${TORCH}"
    elif reachable download.pytorch.org; then
        # PyTorch's CPU index holds the "+cpu" build; PyPI's Linux build pulls ~3 GB of CUDA.
        say "installing torch ${TORCH}, the CPU build (~200 MB), from PyTorch's CPU index"
        pip_install "torch==${TORCH}+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
    else
        # No PyTorch index from here (a closed network with a package mirror): the mirror's
        # torch, which on such machines is the CPU wheel kept beside it.
        say "installing torch ${TORCH} from the configured package index (PyTorch's CPU" \
            "index is out of reach from here)"
        pip_install "torch==${TORCH}"
    fi
}

install_core() {
    install_torch
    say "installing deltasvd (editable, from this folder) with safetensors, numpy and tqdm"
    pip_install -c .ci/constraints.txt -e .
}

install_tests() {
    say "installing pytest, gradio and selenium (the explorer page and its browser test)"
    pip_install -c .ci/constraints.txt pytest gradio selenium
    say "installing a real ComfyUI 0.3.75 into ${DELTASVD_COMFYUI_DIR:-~/.cache/deltasvd/comfyui}" \
        "(outside the repo) and its ~45 packages into this Python"
    bash .ci/setup_comfyui.sh >/dev/null
    if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
        say "installing Debian's chromium and chromium-driver (for the browser tests)"
        local sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
        $sudo apt-get update -qq
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
    fi
}

case "$MODE" in
    demo)
        install_core
        say "running the demo"
        exec "$PY" -m deltasvd demo
        ;;
    test)
        install_core
        install_tests
        say "running the tests: 7-10 minutes on 2 cores (more on a busy machine); they" \
            "write up to ~8 GB of checkpoints to the temp folder and remove them"
        set +e
        "$PY" -m pytest -q
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "setup: no tests were collected" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash tools/setup.sh demo|test" >&2
        exit 2
        ;;
esac
