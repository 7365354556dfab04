# Sourced by demo.sh and test.sh: make .venv and install straw with the given extras, once per change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "straw needs Python 3.11 or newer: install python3 (Debian: apt-get install python3 python3-venv)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "straw needs Python 3.11 or newer; $("$PYTHON" --version) found. Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PYTHON" -m venv .venv || {
    echo "could not create a virtual environment (Debian: apt-get install python3-venv)" >&2
    exit 1
  }
fi
install_straw() {  # $1: extras, e.g. "test"
  local stamp=".venv/.straw-installed-$1"
  local want
  want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing straw[$1] into .venv (first run takes a minute)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    # constraints.txt: the versions the tests last passed with, so every machine gets the same ones.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$1]" >&2
    echo "$want" > "$stamp"
  fi
}
