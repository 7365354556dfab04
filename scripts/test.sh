#!/usr/bin/env bash
# Run the tests: install what they need, say which services are there, lint, type-check, pytest.
source "$(dirname "$0")/_venv.sh"
install_straw test
.venv/bin/python -m tests.services >&2
echo "ruff:" >&2
.venv/bin/python -m ruff check --quiet . >&2
echo "mypy --strict:" >&2
.venv/bin/python -m mypy >&2
exec .venv/bin/python -m pytest "$@"
