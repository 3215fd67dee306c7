#!/usr/bin/env bash
# The README's "Install and generate" block, then its Python API example, run as written in a fresh virtual
# environment (so only the runtime dependencies are there), against a local stand-in for the hub (.ci/fake_hub.py).
# Fails if an install step is missing, if either fails, or if either writes anything to stderr (warnings included).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python .ci/fake_hub.py "$work/hub"
python -m venv "$work/venv"
install=$(python .ci/readme_block.py "Install and generate")  # (assignments stop the script if they fail)
example=$(python .ci/readme_block.py "Python API" python)
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"
export HF_HUB_OFFLINE=1 HF_HUB_CACHE="$work/hub" TORCH_EXTENSIONS_DIR="$work/torch_extensions"
while IFS= read -r line; do
    [[ -z "$line" || "$line" == \#* ]] && continue
    echo "+ $line"
    if [[ "$line" == nanoflant5\ * ]]; then
        if ! bash -c "$line" >"$work/out" 2>"$work/err"; then
            cat "$work/err"; echo "newcomer check: '$line' failed"; exit 1
        fi
        cat "$work/out"
        if [[ -s "$work/err" ]]; then
            cat "$work/err"; echo "newcomer check: '$line' wrote the above to stderr"; exit 1
        fi
        [[ -s "$work/out" ]] || { echo "newcomer check: '$line' printed nothing"; exit 1; }
    else
        bash -c "$line"
    fi
done <<< "$install"
echo "+ the README's Python API example"
python -c "$example" >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }
if [[ -s "$work/err" ]]; then
    cat "$work/err"; echo "newcomer check: the Python API example wrote the above to stderr"; exit 1
fi
if python -c "import transformers" 2>/dev/null || python -c "import pytest" 2>/dev/null; then
    echo "newcomer check: the virtual environment has test dependencies"; exit 1
fi
echo "newcomer check: ok"
