#!/usr/bin/env bash
# Check that circuit-tracer 0.5.0's load_clt reads saelab's cross-layer transcoder export and computes what saelab
# computes (latents, outputs) on the same raw inputs. circuit-tracer runs in its own venv (venv.sh).
# Usage, from the project root:  bash scripts/circuit_tracer_compat/check_saelab.sh
exec bash "$(dirname "$0")/../compat_check.sh" scripts/circuit_tracer_compat/venv.sh \
    scripts/circuit_tracer_compat/make_saelab_clt.py scripts/circuit_tracer_compat/check_clt.py
