#!/usr/bin/env bash
# The offline GPU compile check (tools/compile_check.py) under triton 3.6, the version the GPU
# machines run (with torch 2.11). Uses the venv .venv36 at the repository root; create it once:
#   python3 -m venv .venv36
#   cp .venv/lib/python3.*/site-packages/base.pth .venv36/lib/python3.*/site-packages/  # torch, if shared
#   .venv36/bin/pip install "triton==3.6.0" "numpy<2.4"
#   .venv36/bin/pip install --no-deps --no-build-isolation -e .
# (numpy<2.4: the triton 3.6 interpreter fails with numpy 2.4; the compile check itself does not
# use the interpreter.) Arguments are passed on, e.g. --level full --json out.json.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv36/bin/python"
if [ ! -x "$python" ]; then
    echo "compile_check_triton36.sh: $python not found; create .venv36 as described at the top of this script" >&2
    exit 2
fi
version="$("$python" -c 'import triton; print(triton.__version__)')"
case "$version" in
    3.6.*) ;;
    *) echo "compile_check_triton36.sh: .venv36 has triton $version, expected 3.6.x" >&2; exit 2 ;;
esac
exec env -u TRITON_INTERPRET "$python" "$root/tools/compile_check.py" "$@"
