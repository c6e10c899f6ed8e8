# Sourced by the SAELens scripts: SAELens lives in its own throwaway venv (it pins transformer-lens < 4, saelab
# uses 4.x), made on first use at $SAELENS_VENV (default ~/.cache/saelab/saelens-venv; torch==2.13.0 first, so
# pip takes the CPU wheel). Sets VENV.
VENV=${SAELENS_VENV:-$HOME/.cache/saelab/saelens-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sae_lens" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q sae-lens
fi
