#!/usr/bin/env bash
# Check that every layout saelab exports loads in SAELens itself and gives the same outputs.
# SAELens lives in its own throwaway environment (it pins transformer-lens < 4, saelab uses 4.x), created on
# first use at $SAELENS_VENV (default ~/.cache/saelab/saelens-venv; torch==2.13.0 first, so pip takes the CPU
# wheel). Usage, from the project root:  bash scripts/saelens_compat/run.sh
exec bash "$(dirname "$0")/../compat_check.sh" scripts/saelens_compat/venv.sh scripts/saelens_compat/export_layouts.py \
    scripts/saelens_compat/check_in_saelens.py
