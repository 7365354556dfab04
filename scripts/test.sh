#!/usr/bin/env bash
# Run the tests: install what they need, say which services are there, lint, type-check, pytest.
source "$(dirname "$0")/_venv.sh"
install_straw test

# ODBC drivers for tests/test_db_odbc.py (Debian packages): installed when missing and we are root;
# otherwise those tests are skipped and say what to install.
ODBC_PACKAGES="unixodbc odbc-postgresql odbc-mariadb libsqliteodbc"
odbc_drivers_present() {
  command -v odbcinst >/dev/null 2>&1 &&
    [ "$(odbcinst -q -d 2>/dev/null | grep -cE '^\[(PostgreSQL Unicode|MariaDB Unicode|SQLite3)\]$')" = 3 ]
}
if ! odbc_drivers_present; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ODBC drivers: $ODBC_PACKAGES" >&2
    # shellcheck disable=SC2086 # a list of package names
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q $ODBC_PACKAGES >&2 ||
      { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $ODBC_PACKAGES >&2; }; } ||
      echo "could not install the ODBC drivers; ODBC tests will be skipped" >&2
  else
    echo "ODBC drivers missing (apt-get install $ODBC_PACKAGES as root); ODBC tests will be skipped" >&2
  fi
fi
# Browser-mode scrape tests drive Debian's Chromium (Playwright's own browser download does not work offline).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the browser-mode scrape tests (apt-get, a few minutes)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
      || echo "chromium could not be installed: browser-mode scrape tests will be skipped" >&2
  else
    echo "no /usr/bin/chromium and not root: browser-mode scrape tests will be skipped (apt-get install chromium)" >&2
  fi
fi
# RabbitMQ Streams tests need the broker's stream plugin (port 5552). Enabling a plugin does not restart the
# broker; as root we enable it when a broker runs without it, otherwise those tests are skipped with the reason.
STRAW_RABBITMQ_STREAM_PORT="${STRAW_RABBITMQ_STREAM_PORT:-5552}"
stream_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$STRAW_RABBITMQ_STREAM_PORT") 2>/dev/null; }
if ! stream_port_open && command -v rabbitmq-plugins >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "enabling the RabbitMQ stream plugin (rabbitmq-plugins enable rabbitmq_stream)" >&2
    if rabbitmq-plugins enable rabbitmq_stream >&2; then
      for _ in $(seq 60); do stream_port_open && break; sleep 1; done
    fi
    stream_port_open || echo "RabbitMQ stream port $STRAW_RABBITMQ_STREAM_PORT still closed; its tests will be skipped" >&2
  else
    echo "RabbitMQ runs without its stream plugin and we are not root: RabbitMQ Streams tests will be skipped" \
      "(rabbitmq-plugins enable rabbitmq_stream)" >&2
  fi
fi
.venv/bin/python -m tests.services >&2
echo "ruff:" >&2
.venv/bin/python -m ruff check --quiet . >&2
echo "mypy --strict:" >&2
.venv/bin/python -m mypy >&2
# Two passes. First four xdist workers on two cores: most tests wait on services, not the CPU; the tests that
# must not overlap (kills, outages, settle races) go in lanes, one worker each (tests/conftest.py,
# SERIAL_MODULES). Then the tests whose deadlines want the CPU to themselves (`alone`: leases, a timed stop,
# the connection budget), in one process. Arguments go to both: `./scripts/test.sh tests/test_lease.py`,
# `-n 8` for more workers (STRAW_TEST_WORKERS=8 too), `-n 0` for one process throughout.
# pytest's exit code 5 is "no test selected": fine for one pass when the arguments select tests of the other.
set +e
.venv/bin/python -m pytest -n "${STRAW_TEST_WORKERS:-4}" --dist loadgroup -m "not alone" "$@"
parallel=$?
.venv/bin/python -m pytest -n 0 -m alone "$@"
alone=$?
set -e
for code in "$parallel" "$alone"; do
  if [ "$code" != 0 ] && [ "$code" != 5 ]; then exit "$code"; fi
done
if [ "$parallel" = 5 ] && [ "$alone" = 5 ]; then exit 5; fi
exit 0
