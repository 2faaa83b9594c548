#!/usr/bin/env bash
# The test command (README): unit + integration tiers on CPU. tests/gpu are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
"$PY" -m pytest tests/unit tests/integration -q -p no:cacheprovider --timeout=900 "$@"
