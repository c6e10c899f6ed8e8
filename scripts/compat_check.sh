#!/usr/bin/env bash
# Check saelab's files in a peer's own throwaway venv (a peer that pins transformer-lens < 4, saelab uses 4.x):
#   bash scripts/compat_check.sh VENV_SCRIPT MAKE_SCRIPT CHECK_SCRIPT
# VENV_SCRIPT is sourced and sets VENV (made on first use); MAKE_SCRIPT runs in saelab's .venv and writes its files
# into a temporary directory; CHECK_SCRIPT runs in the peer's venv on that directory. Run from the project root.
set -euo pipefail
cd "$(dirname "$0")/.."
source "$1"  # sets VENV
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
.venv/bin/python "$2" "$OUT" > /dev/null
"$VENV/bin/python" "$3" "$OUT"
