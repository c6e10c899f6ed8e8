# Sourced by the circuit-tracer scripts: circuit-tracer lives in its own throwaway venv (0.5.0 pins
# transformer-lens < 4, saelab uses 4.x), made on first use at $CIRCUIT_TRACER_VENV (default
# ~/.cache/saelab/circuit-tracer-venv; torch==2.13.0 first, so pip takes the CPU wheel). Sets VENV.
VENV=${CIRCUIT_TRACER_VENV:-$HOME/.cache/saelab/circuit-tracer-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import circuit_tracer" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q circuit-tracer==0.5.0 torch==2.13.0
fi
