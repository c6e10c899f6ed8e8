#!/usr/bin/env bash
# Check that circuit-tracer 0.5.0's load_clt reads the cross-layer transcoder format as specified in
# make_clt_fixture.py and gives the same latents and outputs as a plain-torch reference of its maths.
# circuit-tracer lives in its own throwaway environment (it pins transformer-lens < 4, saelab uses 4.x), created on
# first use at $CIRCUIT_TRACER_VENV (default ~/.cache/saelab/circuit-tracer-venv; torch==2.13.0 first, so pip takes
# the CPU wheel). Usage, from the project root:  bash scripts/circuit_tracer_compat/run.sh
exec bash "$(dirname "$0")/../compat_check.sh" scripts/circuit_tracer_compat/venv.sh \
    scripts/circuit_tracer_compat/make_clt_fixture.py scripts/circuit_tracer_compat/check_clt.py
