#!/usr/bin/env bash
# Check that every layout saelab exports loads in SAELens itself and gives the same outputs.
# SAELens lives in its own throwaway environment (it pins transformer-lens < 4, saelab uses 4.x), created on
# first use at $SAELENS_VENV (default ~/.cache/saelab/saelens-venv; torch==2.13.0 first, so pip takes the CPU
# wheel). Usage, from the project root:  bash scripts/saelens_compat/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${SAELENS_VENV:-$HOME/.cache/saelab/saelens-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sae_lens" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q sae-lens
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
.venv/bin/python scripts/saelens_compat/export_layouts.py "$OUT" > /dev/null
"$VENV/bin/python" scripts/saelens_compat/check_in_saelens.py "$OUT"
