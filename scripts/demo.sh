#!/usr/bin/env bash
# Run the demo: a legacy ERP order table (SQLite) -> straw -> a Redis stream. See README.md.
source "$(dirname "$0")/_venv.sh"
install_straw embedded-redis
exec .venv/bin/python -m fixtures.demo "$@"
