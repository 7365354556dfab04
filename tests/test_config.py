"""Configuration mistakes as a new user makes them: one readable line each, naming file, line, key and fix.

Every case edits the valid BASE below; its line numbers are counted by hand
(BASE's lines are numbered in the comment), and each case also asserts that the
line it names really holds the offending key.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from fixtures.legacy_orders import create_orders
from straw.config_load import ConfigError, load_config
from tests.test_cli import invoke, lines

# Line numbers:  1 instance / 2 redis / 3 url / 4 outbox / 5 path / 6 entities / 7 order / 8 key / 9 fields
# 10 order_no / 11 customer / 12 sources / 13 - name / 14 url / 15 table / 16 mode / 17 incrementing_column
# 18 entity / 19 stream / 20 timezone / 21 poll_interval / 22 mapping / 23 order_no / 24 customer
BASE = textwrap.dedent(
    """\
    instance: test
    redis:
      url: redis://127.0.0.1:6379/0
    outbox:
      path: var/outbox.db
    entities:
      order:
        key: [order_no]
        fields:
          order_no: integer
          customer: string
    sources:
      - name: orders
        url: sqlite:///legacy.db
        table: ORDERS
        mode: incrementing
        incrementing_column: ORDER_NO
        entity: order
        stream: erp.orders
        timezone: Europe/Amsterdam
        poll_interval: 5s
        mapping:
          order_no: ORDER_NO
          customer: CUST_NAME
    """
)

SECOND_ORDERS = (
    "  - {name: orders, url: 'sqlite:///b.db', table: T, mode: incrementing, incrementing_column: N,\n"
    "     entity: order, stream: b.orders}\n"
)


def case(name: str, old: str, new: str, line: int, key: str, held: str, hint: str) -> object:
    """BASE with `old` replaced by `new` must fail at `line` (which holds `held`) on `key`, hinting `hint`."""
    return pytest.param(old, new, line, key, held, hint, id=name)


CASES = [
    case("typo", "    table: ORDERS\n", "    table: ORDERS\n    batchsize: 500\n",
         16, "sources[0].batchsize", "batchsize:", "unknown key `batchsize`; did you mean `batch_size`?"),
    case("missing-url", "    url: sqlite:///legacy.db\n", "",
         13, "sources[0].url", "- name: orders", "missing required key `url`; add it"),
    case("wrong-mode", "mode: incrementing", "mode: timestamps",
         16, "sources[0].mode", "mode: timestamps", "(got 'timestamps'); did you mean 'timestamp'?"),
    case("mode-without-column", "    incrementing_column: ORDER_NO\n", "",
         16, "sources[0].mode", "mode: incrementing", "mode 'incrementing' needs `incrementing_column`"),
    case("missing-env", "sqlite:///legacy.db", "postgresql+psycopg://erp:${DB_PASSWORD}@erp-db/erp",
         14, "sources[0].url", "${DB_PASSWORD}", "environment variable DB_PASSWORD is not set; export it or"),
    case("unreadable-file", "sqlite:///legacy.db", "postgresql+psycopg://erp:${file:secrets/db_pw}@erp-db/erp",
         14, "sources[0].url", "${file:secrets/db_pw}", "secrets/db_pw: No such file or directory; create it"),
    case("undeclared-entity", "entity: order\n", "entity: orders\n",
         18, "sources[0].entity", "entity: orders", "not declared under `entities`; declare it there or use one of"),
    case("unknown-mapped-field", "      customer: CUST_NAME", "      custmer: CUST_NAME",
         24, "sources[0].mapping.custmer", "custmer:", "maps custmer, not a field of entity 'order'; map the"),
    case("undeclared-key-field", "key: [order_no]", "key: [order_id]",
         8, "entities.order.key[0]", "key: [order_id]", "declare them there or fix `key`"),
    case("bad-duration", "poll_interval: 5s", "poll_interval: 5 minutes",
         21, "sources[0].poll_interval", "5 minutes", "not a duration: '5 minutes'; write seconds (5), or a"),
    case("unknown-timezone", "Europe/Amsterdam", "Europe/Amsterdm",
         20, "sources[0].timezone", "Europe/Amsterdm", "unknown time zone 'Europe/Amsterdm'; did you mean "
         "'Europe/Amsterdam'?"),
    case("duplicate-source", "      customer: CUST_NAME\n", "      customer: CUST_NAME\n" + SECOND_ORDERS,
         25, "sources[1].name", "{name: orders", "two sources are named 'orders'; names must be unique"),
    case("unknown-kind", "    table: ORDERS\n", "    table: ORDERS\n    kind: odbc\n",
         16, "sources[0].kind", "kind: odbc", "unknown kind 'odbc'; use one of: 'db'"),
    case("stream-unbalanced-tag", "stream: erp.orders", "stream: erp.{orders",
         19, "sources[0].stream", "erp.{orders", "unbalanced or nested braces in 'erp.{orders'; a stream name may"),
    case("stream-empty-tag", "stream: erp.orders", "stream: erp.{}orders",
         19, "sources[0].stream", "erp.{}orders", "empty hash tag in 'erp.{}orders' (Redis would hash the whole"),
    case("stream-two-tags", "stream: erp.orders", "stream: '{erp}.{orders}'",
         19, "sources[0].stream", "{erp}.{orders}", "more than one hash tag in '{erp}.{orders}' (Redis hashes on the"),
    # URLs are checked at load (issue 8, item 12): redis-py would take db 0 for `/seven` and fail later on the rest.
    case("redis-no-scheme", "redis://127.0.0.1:6379/0", "127.0.0.1:6379",
         3, "redis.url", "127.0.0.1:6379", "no scheme; start it with redis://"),
    case("redis-bad-port", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:99999/0",
         3, "redis.url", ":99999", "the port is not a number from 1 to 65535"),
    case("redis-port-word", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:redis/0",
         3, "redis.url", ":redis", "the port is not a number from 1 to 65535"),
    case("redis-empty", "redis://127.0.0.1:6379/0", "''",
         3, "redis.url", "url: ''", "empty; write the Redis URL, e.g. redis://127.0.0.1:6379/0"),
    case("redis-empty-default", "redis://127.0.0.1:6379/0", "${STRAW_TEST_NOPE:-}",
         3, "redis.url", "${STRAW_TEST_NOPE:-}", "empty; write the Redis URL"),
    case("redis-db-word", "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/seven",
         3, "redis.url", "/seven", "the database after the host is not a number; write /0, /1"),
    case("redis-other-scheme", "redis://127.0.0.1:6379/0", "http://127.0.0.1:6379/0",
         3, "redis.url", "http://", "'http://' is not a Redis URL scheme; write redis://, rediss:// or unix://"),
    case("bus-unknown-scheme", "redis:\n  url: redis://127.0.0.1:6379/0", "bus:\n  url: kafka://broker:9092",
         3, "bus.url", "kafka://", "'kafka://' names no bus straw speaks; write redis://"),
    case("bus-no-host", "redis:\n  url: redis://127.0.0.1:6379/0", "bus:\n  url: 'nats://:4222'",
         3, "bus.url", "nats://:4222", "no host; e.g. nats://127.0.0.1:4222"),
    case("bus-redis-checked", "redis:\n  url: redis://127.0.0.1:6379/0", "bus:\n  url: redis://127.0.0.1:6379/x",
         3, "bus.url", "/x", "the database after the host is not a number"),
    case("bus-and-redis", "outbox:\n", "bus: {url: 'nats://127.0.0.1:4222'}\noutbox:\n",
         4, "bus", "bus: {url:", "both `bus` and `redis` are given; keep one"),
    case("db-url-no-scheme", "sqlite:///legacy.db", "127.0.0.1:5432/erp",
         14, "sources[0].url", "127.0.0.1:5432/erp", "not a SQLAlchemy URL; write dialect+driver://user@host/db"),
    case("db-url-unknown-dialect", "sqlite:///legacy.db", "informix://erp@erp-db/erp",
         14, "sources[0].url", "informix://", "unknown database kind 'informix'; write e.g. postgresql+psycopg://"),
    case("db-url-postgres-alias", "sqlite:///legacy.db", "postgres://erp@erp-db/erp",
         14, "sources[0].url", "postgres://", "unknown database kind 'postgres'; did you mean 'postgresql+psycopg'?"),
    case("db-url-driver-missing", "sqlite:///legacy.db", "postgresql+psycopg2://erp@erp-db/erp",
         14, "sources[0].url", "psycopg2://", "the driver for 'postgresql+psycopg2' is not installed (no module "
         "psycopg2); install it"),
    # Accepted silently before (item 13).
    case("poll-interval-yes", "poll_interval: 5s", "poll_interval: yes",
         21, "sources[0].poll_interval", "yes", "not a duration: 'yes'; write seconds (5)"),
    case("poll-interval-zero", "poll_interval: 5s", "poll_interval: 0",
         21, "sources[0].poll_interval", "poll_interval: 0", "at least 50 ms: a shorter interval polls the legacy"),
    case("duplicate-entity-key", "    key: [order_no]\n", "    key: [order_no]\n    key: [customer]\n",
         9, "key", "key: [customer]", "duplicate key (first at line 8); YAML would silently keep only the last"),
    case("duplicate-source-key", "    table: ORDERS\n", "    table: ORDERS\n    table: ORDER\n",
         16, "table", "table: ORDER", "duplicate key (first at line 15)"),
    case("scale-on-integer", "order_no: integer\n", "order_no: {type: integer, scale: 2}\n",
         10, "entities.order.fields.order_no.scale", "scale: 2", "`scale` applies to type 'decimal' only (this "
         "field is 'integer'); remove it"),
    case("key-column-in-incrementing-mode", "    incrementing_column: ORDER_NO\n",
         "    incrementing_column: ORDER_NO\n    key_column: no_such_col\n",
         18, "sources[0].key_column", "key_column: no_such_col", "`key_column` applies to mode 'timestamp' only, "
         "and this source's mode is 'incrementing'; remove it"),
    case("incrementing-column-in-snapshot-mode", "mode: incrementing", "mode: snapshot",
         17, "sources[0].incrementing_column", "incrementing_column:", "`incrementing_column` applies to mode "
         "'incrementing' only, and this source's mode is 'snapshot'; remove it"),
    case("metrics-host", "outbox:\n", "metrics: {port: 9464, host: 'local host'}\noutbox:\n",
         4, "metrics.host", "local host", "'local host' is not an IP address or host name; write e.g. 127.0.0.1"),
    case("timezone-lowercase-utc", "Europe/Amsterdam", "utc",
         20, "sources[0].timezone", "utc", "unknown time zone 'utc'; did you mean 'UTC'?"),
    case("stream-bad-character", "stream: erp.orders", "stream: erp/{orders}",
         19, "sources[0].stream", "erp/{orders}", "use letters, digits, '_', '.', '-' and at most one Redis Cluster"),
]


def write(directory: Path, text: str, name: str = "straw.yaml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_base_is_valid(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    assert config.sources[0].kind == "db"  # `kind` may be left out
    assert config.sources[0].poll_interval == 5.0


@pytest.mark.parametrize("stream", ["erp.{orders}", "'{erp}.orders'", "\"{shop-1}.orders.v2\"", "erp.{a}.v2"])
def test_a_stream_name_may_hold_one_redis_cluster_hash_tag(tmp_path: Path, stream: str) -> None:
    config = load_config(write(tmp_path, BASE.replace("stream: erp.orders", f"stream: {stream}")))
    assert config.sources[0].stream == stream.strip("'\"")
    assert config.streams == [stream.strip("'\"")]


@pytest.mark.parametrize(("old", "new", "line", "key", "held", "hint"), CASES)
def test_a_mistake_is_one_line_with_file_line_key_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, line: int, key: str, held: str, hint: str
) -> None:
    monkeypatch.delenv("DB_PASSWORD", raising=False)
    monkeypatch.delenv("STRAW_TEST_NOPE", raising=False)
    assert BASE.count(old) == 1
    text = BASE.replace(old, new)
    assert held in text.splitlines()[line - 1], "the expected line number is miscounted"
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert (problem.file, problem.line, problem.key) == (str(path), line, key)
    assert str(problem).startswith(f"{path}:{line}: {key}: ")
    assert hint in problem.message

    result = invoke("check", "--config", str(path))
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert lines(result.stderr) == ["configuration error", f"  {problem}"]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("broken", "line", "problem"),
    [
        ("  url: redis://127.0.0.1:6379/0\n   socket_timeout: 3\n", 4, "mapping values are not allowed here"),
        ("  url: redis://127.0.0.1:6379/0\n\tsocket_timeout: 3\n", 4, "found character '\\t'"),
        ("  url: [redis://127.0.0.1:6379/0\n", 4, "expected ',' or ']'"),
    ],
    ids=["over-indented", "tab", "unclosed-bracket"],
)
def test_invalid_yaml_names_the_line_and_says_what_to_check(
    tmp_path: Path, broken: str, line: int, problem: str
) -> None:
    path = write(tmp_path, BASE.replace("  url: redis://127.0.0.1:6379/0\n", broken))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [found] = caught.value.problems
    assert found.line == line
    assert problem in found.message and "check the indentation" in found.message
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 2 and len(lines(result.stderr)) == 2 and "Traceback" not in result.output


def test_every_substitution_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_VAR_A", raising=False)
    monkeypatch.delenv("NO_SUCH_VAR_B", raising=False)
    text = BASE.replace("redis://127.0.0.1:6379/0", "${NO_SUCH_VAR_A}").replace("erp.orders", "${NO_SUCH_VAR_B}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert [(p.line, p.key) for p in caught.value.problems] == [(3, "redis.url"), (19, "sources[0].stream")]


def test_defaults_config_dir_and_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRAW_TEST_REDIS", raising=False)
    monkeypatch.setenv("STRAW_TEST_STREAM", "")  # empty counts as unset when there is a default
    write(tmp_path / "conf", "ERP\n", "secrets/table")  # trailing newline stripped
    text = (
        BASE.replace("redis://127.0.0.1:6379/0", "${STRAW_TEST_REDIS:-redis://127.0.0.1:6390/2}")
        .replace("path: var/outbox.db", "path: ${CONFIG_DIR}/state/outbox.db")
        .replace("table: ORDERS", "table: ${file:secrets/table}ORDERS")
        .replace("stream: erp.orders", "stream: ${STRAW_TEST_STREAM:-erp.orders}")
    )
    path = write(tmp_path / "conf", text)
    config = load_config(path)
    assert config.redis.url == "redis://127.0.0.1:6390/2"
    assert config.outbox.path == (tmp_path / "conf" / "state" / "outbox.db").resolve()
    assert config.sources[0].table == "ERPORDERS"
    assert config.sources[0].stream == "erp.orders"

    monkeypatch.setenv("STRAW_TEST_REDIS", "redis://10.0.0.5:6379/0")
    assert load_config(path).redis.url == "redis://10.0.0.5:6379/0"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'legacy.db'}")
    create_orders(engine, 3)
    engine.dispose()
    text = (
        BASE.replace("path: var/outbox.db", "path: ../var/outbox.db")
        .replace("sqlite:///legacy.db", "sqlite:///../data/legacy.db")
    )
    write(tmp_path / "conf", text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config("../conf/straw.yaml")
    assert config.outbox.path == (tmp_path / "var" / "outbox.db").resolve()  # no `..` left in what is shown
    assert make_url(config.sources[0].url).database == str((tmp_path / "data" / "legacy.db").resolve())

    shown = invoke("preview", "orders", "--config", "../conf/straw.yaml")
    assert shown.exit_code == 0, shown.output
    assert [row.split("│")[1].strip() for row in shown.stdout.splitlines() if row.startswith("│")] == ["1", "2", "3"]
    assert not (elsewhere / "legacy.db").exists() and not list(elsewhere.iterdir())


def test_url_passwords_with_special_characters_are_encoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRAW_TEST_DB_PW", "p@ss/w:rd#1")
    text = BASE.replace("sqlite:///legacy.db", "postgresql+psycopg://erp:${STRAW_TEST_DB_PW}@erp-db:5433/erp")
    url = make_url(load_config(write(tmp_path, text)).sources[0].url)
    assert (url.username, url.password, url.host, url.port) == ("erp", "p@ss/w:rd#1", "erp-db", 5433)


@pytest.mark.parametrize("url", ["127.0.0.1:6379", "redis://127.0.0.1:99999/0", "''", "redis://127.0.0.1:6379/seven"])
@pytest.mark.parametrize("command", [("check",), ("status",), ("run", "--once"), ("preview", "orders")])
def test_a_bad_redis_url_is_one_line_from_every_command(tmp_path: Path, url: str, command: tuple[str, ...]) -> None:
    """Before: `check` passed its config line, then `check`, `run` and `status` ended in a ValueError traceback."""
    path = write(tmp_path, BASE.replace("redis://127.0.0.1:6379/0", url))
    result = invoke(*command, "--config", str(path))
    assert result.exit_code == 2, result.output
    assert lines(result.stderr) == ["configuration error", lines(result.stderr)[1]]
    assert lines(result.stderr)[1].startswith(f"  {path}:3: redis.url: ")
    assert "Traceback" not in result.output
