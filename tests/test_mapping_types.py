"""Types arrive exact, end to end: legacy column -> mapping -> outbox -> Redis stream -> parsed JSON."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis
import yaml
from sqlalchemy import BigInteger, Column, Date, DateTime, MetaData, Numeric, String, Table, create_engine, insert

from fixtures.legacy_orders import create_orders, order_rows
from tests.helpers import orders_config, read_stream, run_once

BIG = 2**53 + 1  # 9007199254740993: the first integer a float (and JavaScript) cannot hold

TYPED_ROWS: list[dict[str, Any]] = [
    {"ID": 1, "AMOUNT": Decimal("0.10"), "DAY": dt.date(2026, 11, 15), "AT": dt.datetime(2026, 11, 15, 10, 30),
     "COUNTER": BIG, "NAME": "Bäckerei Müller", "NOTE": None},
    {"ID": 2, "AMOUNT": Decimal("0.20"), "DAY": dt.date(2026, 7, 15), "AT": dt.datetime(2026, 7, 15, 10, 30, 5),
     "COUNTER": -BIG, "NAME": "Łódź Meble", "NOTE": "ring twice"},
    {"ID": 3, "AMOUNT": Decimal("9999999999.99"), "DAY": dt.date(2024, 2, 29), "AT": None,
     "COUNTER": 0, "NAME": "Señor Núñez SL — “Zoë” 日本", "NOTE": None},
    {"ID": BIG, "AMOUNT": Decimal("-0.01"), "DAY": None, "AT": dt.datetime(2026, 3, 29, 1, 59, 59),
     "COUNTER": None, "NAME": "Café Ørsted", "NOTE": ""},
]
TYPED_ENTITY = {
    "key": ["id"],
    "fields": {
        "id": "integer",
        "amount": {"type": "decimal", "required": True},  # no scale: the column's own digits must survive
        "day": "date",
        "at": "datetime",
        "counter": "integer",
        "name": "string",
        "note": "string",
    },
}


def typed_table(metadata: MetaData) -> Table:
    return Table(
        "TYPED",
        metadata,
        Column("ID", BigInteger, primary_key=True, autoincrement=False),
        Column("AMOUNT", Numeric(12, 2), nullable=False),
        Column("DAY", Date),
        Column("AT", DateTime),  # naive: the legacy system writes local time
        Column("COUNTER", BigInteger),
        Column("NAME", String(60)),
        Column("NOTE", String(200)),
    )


def typed_config(tmp_path: Path, *, db_url: str, redis_url: str, stream: str) -> Path:
    path = orders_config(
        tmp_path, db_url=db_url, redis_url=redis_url, stream=stream, table="TYPED", incrementing_column="ID",
        mapping={name: name.upper() for name in TYPED_ENTITY["fields"]},
    )
    config = yaml.safe_load(path.read_text())
    config["entities"] = {"order": TYPED_ENTITY}
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def test_types_survive_the_trip_exactly(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    metadata = MetaData()
    table = typed_table(metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), TYPED_ROWS)
    path = typed_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)
    assert run_once(path).errors == []

    events = [e["event"] for e in read_stream(redis_client, stream_name)]
    assert [e["subject"] for e in events] == ["1", "2", "3", str(BIG)]
    first, second, third, last = (e["data"] for e in events)

    assert (first["amount"], second["amount"], third["amount"], last["amount"]) == (
        "0.10", "0.20", "9999999999.99", "-0.01",
    )
    assert Decimal(first["amount"]) + Decimal(second["amount"]) == Decimal("0.30")
    assert (first["day"], second["day"], third["day"], last["day"]) == ("2026-11-15", "2026-07-15", "2024-02-29", None)
    # Europe/Amsterdam: winter time in November, summer time in July and just before the 2026 switch
    assert first["at"] == "2026-11-15T10:30:00+01:00"
    assert second["at"] == "2026-07-15T10:30:05+02:00"
    assert third["at"] is None
    assert last["at"] == "2026-03-29T01:59:59+01:00"
    assert (first["counter"], second["counter"], third["counter"], last["counter"]) == (BIG, -BIG, 0, None)
    assert last["id"] == BIG and type(last["id"]) is int
    assert [e["data"]["name"] for e in events] == [r["NAME"] for r in TYPED_ROWS]
    assert (first["note"], second["note"], last["note"]) == (None, "ring twice", "")
    engine.dispose()


def test_fixture_orders_arrive_field_for_field(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    engine = create_engine(db_url)
    create_orders(engine, 60)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name)
    assert run_once(path).errors == []

    data = [e["event"]["data"] for e in read_stream(redis_client, stream_name)]
    rows = order_rows(60)
    assert len(data) == len(rows)
    for got, row in zip(data, rows, strict=True):
        assert got == {
            "order_no": row["ORDER_NO"],
            "customer": row["CUST_NAME"],
            "amount": f"{row['AMOUNT']:.2f}",
            "currency": row["CURRENCY"],
            "order_date": str(row["ORDER_DATE"]),
            "status": row["STATUS"],
            "paid": row["PAID"] == "J",
            "note": row["NOTE"],
            "changed_at": f"{row['CHANGED_AT']:%Y-%m-%dT%H:%M:%S}+01:00",  # November: CET
        }
    assert sum(Decimal(d["amount"]) for d in data) == sum(Decimal(str(r["AMOUNT"])) for r in rows)
    assert {d["customer"] for d in data} >= {"Bäckerei Müller", "Café Ørsted", "Łódź Meble"}
    engine.dispose()
