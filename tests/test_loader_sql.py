"""The SQL loader on real PostgreSQL, MariaDB and SQLite targets."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from loaders.service import run_loader
from loaders.sql_schema import SchemaError
from straw.config_load import load_config
from tests.crashes import REPO, straw_command
from tests.loader_helpers import loader_config, order_data, xadd_events


def sql_loader(path: Path, redis_url: str, stream: str, url: str, **extra: Any) -> Path:
    spec = {"name": "wh", "kind": "sql", "url": url, "streams": [stream], "create_tables": True,
            "tables": {"order": "orders"}, "claim_idle": "100ms", "block": "100ms", **extra}
    return loader_config(path, redis_url, [spec], stream)


def load_once(config: Path) -> Any:
    loaded = load_config(config)
    return run_loader(loaded, loaded.loaders[0], once=True, stop=threading.Event())


def rows(url: str, table: str = "orders") -> dict[int, dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text(f"SELECT * FROM {table} ORDER BY order_no")).mappings().all()
        return {int(r["order_no"]): dict(r) for r in found}
    finally:
        engine.dispose()


def applied_seq(url: str, stream: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text("SELECT seq FROM straw_applied WHERE stream = :s")
            return int(conn.execute(query, {"s": stream}).scalar_one())
    finally:
        engine.dispose()


def test_records_land_typed_exact_and_in_stream_order_per_key(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, db_url: str
) -> None:
    changes = [
        ("upserted", order_data(1, amount="12345678.91", note="Zoë's [urgent] ✓")),
        ("upserted", order_data(2, amount="0.01")),
        ("deleted", {"order_no": 1}),
        ("upserted", order_data(1, amount="7.50", status="PAID")),  # back after its delete: the last one wins
        ("upserted", order_data(3)),
        ("deleted", {"order_no": 3}),  # never "all upserts, then all deletes"
        ("upserted", order_data(2, amount="99.99", status="SHIPPED")),
    ]
    last = xadd_events(redis_client, stream_name, changes)
    tally = load_once(sql_loader(tmp_path, redis_url, stream_name, db_url))
    assert tally.applied == len(changes)
    got = rows(db_url)
    assert sorted(got) == [1, 2]
    assert str(got[1]["amount"]) == "7.50" and got[1]["status"] == "PAID"  # exact: SQLite keeps it as text
    assert str(got[2]["amount"]) == "99.99"
    stamp = got[1]["changed_at"]
    stamp = stamp if isinstance(stamp, dt.datetime) else dt.datetime.fromisoformat(stamp)
    assert stamp.replace(tzinfo=stamp.tzinfo or dt.UTC) == dt.datetime(2026, 11, 1, 8, 30, tzinfo=dt.UTC)
    assert applied_seq(db_url, stream_name) == last


def test_the_first_batch_on_a_fresh_target_applies_in_one_transaction(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, db_url: str
) -> None:
    """The first batch creates the tables: on MariaDB the collation check of the bookkeeping tables once ran
    outside a transaction of its own, the table's DDL could not begin one, and the batch failed: a batch
    of one record went straight to the dead letters."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    tally = load_once(sql_loader(tmp_path, redis_url, stream_name, db_url, max_deliveries=1))
    assert (tally.applied, tally.dead_letters) == (1, 0)
    assert list(rows(db_url)) == [1]


def test_integers_past_64_bits_in_a_json_field_land_whole(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, db_url: str
) -> None:
    """orjson reads an integer past 64 bits as a float: 12345678901234567890123 became
    1.2345678901234568e+22 in the target. straw publishes such integers exactly (legacy NUMERIC(30) ids),
    so a record holding one is parsed again with the standard library's json."""
    import json

    doc = {"id": 12345678901234567890123, "neg": -(2**65) - 1, "list": [2**64, 0.5, "2**64"], "max": 2**63}
    config = sql_loader(tmp_path, redis_url, stream_name, db_url, max_deliveries=1)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["fields"]["attrs"] = "json"
    config.write_text(yaml.safe_dump(document))
    xadd_events(redis_client, stream_name, [("upserted", {**order_data(1), "attrs": doc}),
                                            ("upserted", {**order_data(2), "attrs": {"small": 7}})])
    assert load_once(config).dead_letters == 0
    got = {n: r["attrs"] for n, r in rows(db_url).items()}
    parsed = {n: v if isinstance(v, (dict, list)) else json.loads(v) for n, v in got.items()}
    assert parsed == {1: doc, 2: {"small": 7}}
    assert isinstance(parsed[1]["id"], int)


def test_a_redelivered_or_replayed_entry_is_skipped(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, sqlite_url: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 4)])
    config = sql_loader(tmp_path, redis_url, stream_name, sqlite_url)
    load_once(config)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # an edit in the target shows whether a change is applied again
        conn.execute(text("UPDATE orders SET note = 'edited' WHERE order_no = 2"))
    engine.dispose()
    redis_client.xgroup_setid(stream_name, "wh", "0")  # every entry is delivered again
    assert load_once(config).applied == 3
    assert rows(sqlite_url)[2]["note"] == "edited"


def test_an_older_version_never_overwrites_a_newer_one(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, pg_url: str
) -> None:
    """A batch holding an old change of a key, applied after a batch with its newer change (two members)."""
    xadd_events(redis_client, stream_name, [("upserted", order_data(1, amount="1.00"))])
    config = sql_loader(tmp_path, redis_url, stream_name, pg_url, batch_size=1)
    loaded = load_config(config)
    from loaders.redis_consumer import RedisConsumer
    from loaders.service import redis_consumer

    slow: RedisConsumer = redis_consumer(loaded, loaded.loaders[0], "slow")
    held = slow.read(1, 0)  # the old change is in flight at a slow member...
    xadd_events(redis_client, stream_name, [("upserted", order_data(1, amount="2.00"))], first_seq=2)
    load_once(config)  # ...while another applies the newer one; then the slow one's batch is applied
    from loaders.records import parse
    from loaders.sql import SqlLoader

    target = SqlLoader(loaded.loaders[0], loaded.entities)  # type: ignore[arg-type]
    assert target.apply([parse(held[0], loaded.entities)]) == []
    target.close()
    assert rows(pg_url)[1]["amount"] == Decimal("2.00")
    assert applied_seq(pg_url, stream_name) == 2


def test_schema_evolution_adds_a_column_and_refuses_removed_or_retyped_fields(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, mariadb_url: str
) -> None:
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    config = sql_loader(tmp_path, redis_url, stream_name, mariadb_url)
    load_once(config)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["fields"]["region"] = "string"  # a new field: a nullable column
    config.write_text(yaml.safe_dump(document))
    xadd_events(redis_client, stream_name, [("upserted", {**order_data(2), "region": "north"})], first_seq=2)
    load_once(config)
    assert rows(mariadb_url)[2]["region"] == "north" and rows(mariadb_url)[1]["region"] is None
    del document["entities"]["order"]["fields"]["note"]  # a removed field
    config.write_text(yaml.safe_dump(document))
    xadd_events(redis_client, stream_name, [("upserted", order_data(3))], first_seq=3)
    with pytest.raises(SchemaError, match=r"table orders has column note.*DROP COLUMN note"):
        load_once(config)
    document["entities"]["order"]["fields"]["note"] = "string"
    document["entities"]["order"]["fields"]["amount"]["scale"] = 4  # a retyped field
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(SchemaError, match=r"table orders column amount has scale 2 but the field has scale 4"):
        load_once(config)


RATIOS = ["0.1", "1.00000000000000", "0.00000000001", "12345.67890123456", "-0.000000000050", None]


def test_a_decimal_without_a_declared_scale_is_stored_exactly_or_dead_lettered_never_rounded(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, db_url: str
) -> None:
    """A field without `scale` gets NUMERIC(38, 10), which rounded 0.00000000001 (a DOUBLE's 1e-11, say) to 0
    without a word. Such a value is a dead letter that says to declare the scale; SQLite keeps it as text."""
    config = sql_loader(tmp_path, redis_url, stream_name, db_url, max_deliveries=1)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["fields"]["ratio"] = "decimal"
    config.write_text(yaml.safe_dump(document))
    xadd_events(redis_client, stream_name, [("upserted", {**order_data(n), "ratio": ratio})
                                            for n, ratio in enumerate(RATIOS, 1)])
    tally = load_once(config)
    got = {n: r["ratio"] for n, r in rows(db_url).items()}
    if db_url.startswith("sqlite"):
        assert tally.dead_letters == 0
        assert got == dict(enumerate(RATIOS, 1))  # exact text
        return
    rounded = {3, 4, 5}
    assert tally.dead_letters == len(rounded)
    assert {n: None if v is None else Decimal(v) for n, v in got.items()} == {
        n: None if r is None else Decimal(r) for n, r in enumerate(RATIOS, 1) if n not in rounded}
    dead = {int(f[b"seq"]): f[b"error"].decode() for _, f in redis_client.xrange(f"{stream_name}.dlq")}
    assert set(dead) == rounded
    assert "field 'ratio': 0.00000000001 has more than 10 decimal places" in dead[3]
    assert "declare the field's `scale`" in dead[3]


def latin1_non_strict(mariadb_url: str) -> str:
    """The scratch database made latin1 by default, and a URL whose sessions start without strict mode: a
    legacy MySQL setup, where the server stores what does not fit silently changed."""
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text(f"ALTER DATABASE `{make_url(mariadb_url).database}` CHARACTER SET latin1"))
    engine.dispose()
    return mariadb_url + "?init_command=SET+sql_mode%3D%27%27"


def site_made_orders(mariadb_url: str, key: str, options: str) -> None:
    """Table `orders` as a site would make it for the loader (not straw): keyed by `key`, with `options`."""
    columns = {"order_no": "BIGINT", "customer": "TEXT", "amount": "NUMERIC(38, 2) NOT NULL", "currency": "TEXT",
               "order_date": "DATE", "status": "VARCHAR(255)", "paid": "BOOLEAN", "note": "TEXT",
               "changed_at": "DATETIME(6)"}
    columns[key] += " NOT NULL PRIMARY KEY"
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE orders ({', '.join(f'{c} {t}' for c, t in columns.items())}) {options}"))
    engine.dispose()


KEYS = ["new", "NEW", "new ", "née", "nee"]  # one key each under a binary collation; 2 under utf8mb4_general_ci


def test_mariadb_keys_apart_by_case_accents_or_blanks_stay_apart_and_text_lands_whole(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, mariadb_url: str
) -> None:
    """Under the server's default collation 'new', 'NEW' and 'new ' were one key (each record overwrote the
    others' row); in a latin1 database '😀' was stored as '?', and a TEXT cut 70,000 characters silently."""
    url = latin1_non_strict(mariadb_url)
    notes = ["emoji 😀 Grüße € ✓", "x" * 70_000, None, "\u0000 and \\", "ß"]
    pairs = list(enumerate(zip(KEYS, notes, strict=True), 1))
    xadd_events(redis_client, stream_name, [("upserted", order_data(n, status=key, note=note))
                                            for n, (key, note) in pairs])
    config = sql_loader(tmp_path, redis_url, stream_name, url)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["key"] = ["status"]
    config.write_text(yaml.safe_dump(document))
    assert load_once(config).dead_letters == 0
    engine = create_engine(mariadb_url)
    with engine.connect() as conn:
        got = {r.status: (r.order_no, r.note) for r in conn.execute(text("SELECT status, order_no, note FROM orders"))}
    engine.dispose()
    assert got == {key: (n, note) for n, (key, note) in pairs}


def test_a_value_a_mariadb_column_cannot_hold_is_a_dead_letter_even_without_strict_mode(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, mariadb_url: str
) -> None:
    """A table the site made (latin1 text), on a server without strict mode: the loader's session is strict,
    so '😀' is refused (a dead letter naming the column), not stored as '?'."""
    url = latin1_non_strict(mariadb_url)
    site_made_orders(mariadb_url, "order_no", "CHARACTER SET latin1")
    xadd_events(redis_client, stream_name, [("upserted", order_data(1, note="Grüße €")),
                                            ("upserted", order_data(2, note="emoji 😀"))])
    tally = load_once(sql_loader(tmp_path, redis_url, stream_name, url, create_tables=False, max_deliveries=1))
    assert (tally.applied, tally.dead_letters) == (1, 1)
    [(_, dead)] = redis_client.xrange(f"{stream_name}.dlq")
    assert int(dead[b"seq"]) == 2 and b"Incorrect string value" in dead[b"error"] and b"note" in dead[b"error"]
    assert {n: r["note"] for n, r in rows(mariadb_url).items()} == {1: "Grüße €"}  # not 'emoji ?'


def test_a_mariadb_text_key_under_a_case_blind_collation_is_refused_with_the_fix(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, mariadb_url: str
) -> None:
    site_made_orders(mariadb_url, "status", "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    xadd_events(redis_client, stream_name, [("upserted", order_data(n, status=key)) for n, key in enumerate(KEYS, 1)])
    config = sql_loader(tmp_path, redis_url, stream_name, mariadb_url)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["key"] = ["status"]
    config.write_text(yaml.safe_dump(document))
    with pytest.raises(SchemaError, match=r"key column status has collation utf8mb4_general_ci.*") as refused:
        load_once(config)
    fix = str(refused.value).split("change it: ")[1]
    assert fix == ("ALTER TABLE orders MODIFY status VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin "
                   "NOT NULL")
    assert rows(mariadb_url) == {}  # nothing written before the refusal
    engine = create_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(text(fix))
    engine.dispose()
    assert load_once(config).applied == len(KEYS)
    assert sorted(r["status"] for r in rows(mariadb_url).values()) == sorted(KEYS)


def test_sigterm_finishes_the_batch_and_exits_0(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, sqlite_url: str
) -> None:
    last = xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 2001)])
    config = sql_loader(tmp_path, redis_url, stream_name, sqlite_url, batch_size=50)
    proc = subprocess.Popen(straw_command(config, "load", "wh"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None and not _some_applied(redis_client, stream_name):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    assert redis_client.xpending(stream_name, "wh")["pending"] == 0  # the batch in hand was acked
    applied = len(rows(sqlite_url))
    assert applied > 0 and applied_seq(sqlite_url, stream_name) == applied <= last


def _some_applied(client: redis.Redis, stream: str) -> bool:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return False
    return bool(groups) and groups[0].get("last-delivered-id") not in (b"0-0", "0-0")


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # NUL included: PostgreSQL refuses it in text


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(
    st.integers(1, 4), st.sampled_from(["upserted", "upserted", "deleted"]), _TEXT,
    st.decimals(min_value=Decimal("-1e40"), max_value=Decimal("1e40"), places=2, allow_nan=False)),
    min_size=1, max_size=12))
def test_hostile_values_land_exactly_or_become_dead_letters(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis, pg_url: str,
    changes: list[tuple[int, str, str, Decimal]],
) -> None:
    """Each key ends as its last change that is not a dead letter; nothing raises, nothing else is lost."""
    stream = f"test.h{uuid.uuid4().hex[:10]}"
    try:
        entries = [(op, {"order_no": key} if op == "deleted" else order_data(key, amount=format(amount, "f"),
                                                                              note=note))
                   for key, op, note, amount in changes]
        xadd_events(redis_client, stream, entries)
        config = sql_loader(tmp_path_factory.mktemp("h"), redis_url, stream, pg_url, max_deliveries=1,
                            tables={"order": f"h{uuid.uuid4().hex[:8]}"})
        load_once(config)
        dead = {int(f[b"seq"]) for _, f in redis_client.xrange(f"{stream}.dlq")}
        expected: dict[int, tuple[str | None, Decimal] | None] = {}
        for seq, (key, op, note, amount) in enumerate(changes, 1):
            if seq not in dead:
                expected[key] = None if op == "deleted" else (note, amount)
        table = yaml.safe_load(config.read_text())["loaders"][0]["tables"]["order"]
        got = {k: (r["note"], r["amount"]) for k, r in rows(pg_url, table).items()}
        assert got == {k: v for k, v in expected.items() if v is not None}
        assert redis_client.xpending(stream, "wh")["pending"] == 0
    finally:
        redis_client.delete(stream, f"{stream}.dlq")


def test_json_and_bytes_fields_round_trip(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, db_url: str
) -> None:
    import base64
    import json

    config = sql_loader(tmp_path, redis_url, stream_name, db_url)
    document = yaml.safe_load(config.read_text())
    document["entities"]["order"]["fields"].update({"attrs": "json", "blob": "bytes"})
    config.write_text(yaml.safe_dump(document))
    values = {1: "hello", 2: {"a": [1, 2.5, None], "ü": True}, 3: None}
    xadd_events(redis_client, stream_name, [
        ("upserted", {**order_data(n), "attrs": value, "blob": base64.b64encode(bytes([n, 0, 255])).decode()})
        for n, value in values.items()])
    assert load_once(config).dead_letters == 0
    got = rows(db_url)
    for n, value in values.items():
        attrs = got[n]["attrs"]
        parsed = attrs if db_url.startswith("postgresql") or attrs is None else json.loads(attrs)  # psycopg parses
        assert parsed == value, (n, attrs)
        assert bytes(got[n]["blob"]) == bytes([n, 0, 255])
