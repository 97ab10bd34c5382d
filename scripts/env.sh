# Sourced by train.sh, eval.sh and test.sh: sets PY to the harness's Python.
#   default: ./.venv, created from requirements.lock on first use (and re-synced when the lock changes)
#   SPEEDRUN_PYTHON=/path/to/python   bring your own environment (GPU clusters): no bootstrap at all
#   SPEEDRUN_EXTRAS=tf                also install the optional TensorFlow extra (requirements-tf.txt)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${SPEEDRUN_PYTHON:-}" ]]; then
  PY="$SPEEDRUN_PYTHON"
else
  VENV="${SPEEDRUN_VENV:-$ROOT/.venv}"
  STAMP="$VENV/.installed-requirements"
  WANT="$(cat "$ROOT/requirements.lock")"
  if [[ "${SPEEDRUN_EXTRAS:-}" == *tf* ]]; then WANT="$WANT$(cat "$ROOT/requirements-tf.txt")"; fi
  HAVE="$(cat "$STAMP" 2>/dev/null || true)"
  # an environment installed with the TF extra also serves a run without it (no reinstall)
  if [[ ! -x "$VENV/bin/python" || ( "$HAVE" != "$WANT" && "$HAVE" != "$WANT$(cat "$ROOT/requirements-tf.txt")" ) ]]; then
    BASE_PY="$(command -v python3.11 || command -v python3)"
    if ! "$BASE_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "[setup] Python 3.11 is required (found $("$BASE_PY" --version 2>&1)); or set SPEEDRUN_PYTHON" >&2
      exit 1
    fi
    echo "[setup] installing the pinned environment into $VENV (first run only, a few minutes)" >&2
    [[ -x "$VENV/bin/python" ]] || "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.lock" >&2
    if [[ "${SPEEDRUN_EXTRAS:-}" == *tf* ]]; then
      "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-tf.txt" >&2
    fi
    printf '%s' "$WANT" > "$STAMP"
  fi
  PY="$VENV/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
