"""Every stream entry is a CloudEvents 1.0 event that the official Python SDK parses.

The events are parsed from the bytes Redis holds, with the SDK's structured
JSON format (cloudevents.core) and with its older HTTP API (cloudevents.v1).
Money arrives as decimal strings equal to the legacy values to the cent, and ids
depend only on the change: the same change read again keeps its id, any later
change gets a new one.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from pathlib import Path

import orjson
import redis
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1.http import from_json
from sqlalchemy import create_engine, select, update

from adapters.db import position
from fixtures.legacy_orders import create_orders
from straw.records import event_id
from tests.helpers import orders_config, read_stream, run_once

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def raw_events(client: redis.Redis, stream: str) -> list[bytes]:
    return [fields[b"event"] for _, fields in client.xrange(stream)]


def test_every_event_parses_with_the_sdk_and_money_stays_exact(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 300)
    with engine.connect() as conn:
        amounts: dict[int, Decimal] = dict(conn.execute(select(table.c.ORDER_NO, table.c.AMOUNT)).all())
        positions = dict(conn.execute(select(table.c.ORDER_NO, table.c.CHANGED_AT)).all())
    engine.dispose()
    config = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    assert run_once(config).errors == []

    raws = raw_events(redis_client, stream_name)
    assert len(raws) == 300
    total = Decimal(0)
    for raw in raws:
        event = JSONFormat().read(None, raw)
        order_no = int(event.get_subject() or "")
        assert event.get_specversion() == "1.0"
        assert event.get_source() == "straw/test/orders"
        assert event.get_type() == "order.upserted"
        assert event.get_id() == event_id(
            "straw/test/orders", str(order_no), position.encode((positions[order_no], order_no))
        )
        assert event.get_datacontenttype() == "application/json"
        observed = event.get_time()
        assert observed is not None and observed.utcoffset() == dt.timedelta(0)
        assert RFC3339_UTC.match(orjson.loads(raw)["time"])

        data = event.get_data()
        assert isinstance(data, dict) and data["order_no"] == order_no
        assert isinstance(data["amount"], str), "money travels as a decimal string, never a float"
        assert Decimal(data["amount"]) == amounts[order_no]
        assert Decimal(data["amount"]).as_tuple().exponent == -2, "the entity's scale (2) is kept"
        total += Decimal(data["amount"])

        # The older SDK API reads the same bytes to the same event.
        legacy = from_json(raw)
        assert (legacy["id"], legacy["source"], legacy["type"], legacy["subject"]) == (
            event.get_id(), event.get_source(), event.get_type(), event.get_subject()
        )
        assert legacy.data == data
        # And the SDK writes it back without losing a digit.
        again = JSONFormat().read(None, JSONFormat().write(event))
        assert again.get_data() == data and again.get_time() == observed
    assert total == sum(amounts.values()), "the money in the stream adds up to the cent"


def test_ids_depend_on_the_change_only(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(sqlite_url)
    table = create_orders(engine, 40)
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    again = f"{stream_name}.again"  # the stream_name fixture cleans up keys containing its name
    first = orders_config(first_dir, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    second = orders_config(second_dir, db_url=sqlite_url, redis_url=redis_url, stream=again, mode="timestamp")
    assert run_once(first).errors == [] and run_once(second).errors == []

    ids = [e["event"]["id"] for e in read_stream(redis_client, stream_name)]
    assert len(set(ids)) == 40
    assert [e["event"]["id"] for e in read_stream(redis_client, again)] == ids, "same change read again, same id"

    with engine.connect() as conn:
        status = conn.execute(select(table.c.STATUS).where(table.c.ORDER_NO == 7)).scalar_one()
    for when, value in ((dt.datetime(2027, 1, 1, 9), "CHANGED"), (dt.datetime(2027, 1, 2, 9), status)):
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.ORDER_NO == 7).values(STATUS=value, CHANGED_AT=when))
        assert run_once(first).rows_read == 1
    engine.dispose()

    entries = [e["event"] for e in read_stream(redis_client, stream_name)]
    seven = [e for e in entries if e["subject"] == "7"]
    assert [e["data"]["status"] for e in seven] == [status, "CHANGED", status]
    assert len({e["id"] for e in seven}) == 3, "a later change gets a new id, even back to the earlier value"
    assert {k: v for k, v in seven[2]["data"].items() if k != "changed_at"} == {
        k: v for k, v in seven[0]["data"].items() if k != "changed_at"
    }
    assert len({e["id"] for e in entries}) == len(entries) == 42
