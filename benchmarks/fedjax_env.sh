#!/usr/bin/env bash
# Creates (or reuses) the FedJAX 0.0.17 virtualenv used by benchmarks/suite.py --with-fedjax.
#
#   benchmarks/fedjax_env.sh            # prints the venv's python on the last line
#
# Location: $FEDTRAIN_FEDJAX_VENV, else $FEDTRAIN_BENCH_DIR/fedjax-venv,
# else ~/.cache/fedtrain/fedjax-venv. Interpreter: $FEDJAX_PYTHON, else python3.11.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bench_dir="${FEDTRAIN_BENCH_DIR:-$HOME/.cache/fedtrain}"
venv="${FEDTRAIN_FEDJAX_VENV:-$bench_dir/fedjax-venv}"
py="${FEDJAX_PYTHON:-python3.11}"
stamp="$venv/.fedtrain-requirements"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$stamp" "$here/fedjax_requirements.txt"; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$(dirname "$venv")"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip >&2
"$venv/bin/python" -m pip install --quiet -r "$here/fedjax_requirements.txt" >&2
"$venv/bin/python" - >&2 <<'PY'
from importlib.metadata import version
import fedjax, jax
assert version("fedjax") == "0.0.17", version("fedjax")
assert jax.__version__ == "0.4.23", jax.__version__
print(f"fedjax {version('fedjax')}, jax {jax.__version__}")
PY
cp "$here/fedjax_requirements.txt" "$stamp"
echo "$venv/bin/python"
