#!/usr/bin/env bash
# saelab against SAELens on identical samples of a synthetic world (issue 25): both implementations trained at
# matched L0, same samples, budget, batch, lr and seeds, scored by saelab's ground-truth metrics on one held-out
# set; writes OUT/crosscheck.md and OUT/crosscheck.csv (see crosscheck.py for the steps).
# SAELens lives in its own throwaway venv, made on first use at $SAELENS_VENV (default
# ~/.cache/saelab/saelens-venv; torch==2.13.0 first, so pip takes the CPU wheel), as scripts/saelens_compat does.
# Every training process runs under `nice -n ${CROSSCHECK_NICE:-10}`. Usage, from the project root:
#   bash scripts/saelens_crosscheck/run.sh [--out DIR] [--l0 8 16] [--seeds 0 1 2] [--lr 3e-3]
#        [--variants relu gated jumprelu topk batchtopk matryoshka_batchtopk] [--saelab-extra K=V ...]
#        -- [data overrides: data=synthetic (default), data.train_tokens=..., data.synthetic.*=...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/saelens_compat/venv.sh  # sets VENV, made on first use
has_out=0
for a in "$@"; do [ "$a" = "--out" ] && has_out=1; done
extra=()
[ $has_out = 1 ] || extra=(--out "outputs/saelens_crosscheck/$(date +%Y-%m-%d_%H-%M-%S)")
exec .venv/bin/python scripts/saelens_crosscheck/crosscheck.py --venv "$VENV" "${extra[@]}" "$@"
