#!/usr/bin/env bash
# On the GPU machine (or the rehearsal's stand-in, PYTHON=...): the carried wheels into a folder of
# their own, over the machine's packages, then the benchmark. pip's --target leaves the machine's
# environment as it is. Usage: benchmarks/gpu/run.sh OUT [--tiny]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
site=$(mktemp -d)
"$PYTHON" -m pip install --quiet --no-index --no-deps --target "$site" benchmarks/gpu/bundle/*.whl
PYTHONPATH="$site" exec "$PYTHON" benchmarks/gpu/run.py --out "$@"
