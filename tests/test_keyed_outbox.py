"""The keyed seam that snapshot and scrape sources share: RawBatch(keyed, complete) -> Mapper -> Outbox.

These tests drive it without a legacy database: a keyed source is anything that
yields keyed RawBatches, and the outbox is the real SQLite file.
"""

from __future__ import annotations

import json
import sqlite3
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest

from outbox import keyed
from outbox.keyed import SEEN
from outbox.store import Outbox
from straw.config import EntitySpec
from straw.mapping import Mapper, content_hash
from straw.records import DELETED, UPSERTED
from straw.source import RawBatch

ENTITY = EntitySpec.model_validate(
    {"key": ["sku", "site"], "fields": {"sku": "string", "site": "integer", "price": {"type": "decimal", "scale": 2}}}
)
COLUMNS = ("sku", "site", "price")


def mapper() -> Mapper:
    return Mapper(source_uri="straw/t/shop", source_name="shop", entity_name="item", entity=ENTITY, mapping={},
                  zone=None)


def batch(rows: list[tuple[Any, ...]], listing: int, *, complete: bool = False,
          ops: list[str] | None = None) -> RawBatch:
    positions = [orjson.dumps([listing, r[0]]).decode() for r in rows]
    end = orjson.dumps([listing]).decode() if complete else None
    return RawBatch(COLUMNS, rows, positions, ops, keyed=True, complete=complete, end=end)


def commit(outbox: Outbox, m: Mapper, raw: RawBatch, encode: keyed.Encode | None = None) -> list[dict[str, Any]]:
    """Map and commit one batch as the runner does; return the events it recorded."""
    mapped = m.map_keyed(raw, partial(outbox.digests, "shop"))
    before = outbox.db.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]  # a row's seq is its last
    outbox.append_keyed("shop", "s", mapped.changes, [], raw.next_position, len(raw.rows),
                        complete=raw.complete, encode=encode or m.encode, unchanged=[i for _k, i in mapped.unchanged])
    return [orjson.loads(r.event) for r in outbox.events(after=before)]


def summary(events: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [(e["type"], e["subject"], e["data"]) for e in events]


def test_listings_become_changes_with_composite_keys(tmp_path: Path) -> None:
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        first = commit(outbox, m, batch([("A/1", 1, "9.99"), ("B", 1, "5")], 1, complete=True))
        assert [e["subject"] for e in first] == ["A%2F1/1", "B/1"]
        # "5.00" is read differently from "5" but maps to the same record: no event
        assert commit(outbox, m, batch([("B", 1, "5.00"), ("A/1", 1, "9.99")], 2, complete=True)) == []
        unchanged = m.map_keyed(batch([("A/1", 1, "9.99")], 3), partial(outbox.digests, "shop"))
        assert (unchanged.changes, [k for k, _i in unchanged.unchanged]) == ([], ["A%2F1/1"])  # not even mapped
        changed = commit(outbox, m, batch([("B", 1, "6"), ("C", 2, "1")], 3, complete=True))
        assert summary(changed) == [
            ("item.upserted", "B/1", {"sku": "B", "site": 1, "price": "6.00"}),
            ("item.upserted", "C/2", {"sku": "C", "site": 2, "price": "1.00"}),
            ("item.deleted", "A%2F1/1", {"sku": "A/1", "site": 1}),
        ]
        assert changed[2]["id"] != first[0]["id"]
        assert keyed.known_keys(outbox.db, "shop") == 2
    finally:
        outbox.close()


def test_deleted_op_is_sent_only_for_a_known_key(tmp_path: Path) -> None:
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        commit(outbox, m, batch([("A", 1, "1")], 1))
        gone = commit(outbox, m, batch([("A", 1, None), ("Z", 1, None)], 1, ops=[DELETED, DELETED]))
        assert summary(gone) == [("item.deleted", "A/1", {"sku": "A", "site": 1})]
        assert commit(outbox, m, batch([("A", 1, None)], 1, ops=[DELETED])) == []
        back = commit(outbox, m, batch([("A", 1, "1")], 1, ops=[UPSERTED], complete=True))
        assert summary(back) == [("item.upserted", "A/1", {"sku": "A", "site": 1, "price": "1.00"})]
    finally:
        outbox.close()


def test_a_failing_batch_leaves_marks_records_and_position_as_they_were(tmp_path: Path) -> None:
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        commit(outbox, m, batch([("A", 1, "1"), ("B", 1, "2")], 1, complete=True))
        state = outbox.db.execute("SELECT * FROM keyed_state ORDER BY key").fetchall()
        calls = 0

        def encode(op: str, key: str, position: str, data: dict[str, Any]) -> bytes:
            nonlocal calls
            calls += 1
            if op == DELETED:
                raise OSError("disk full")  # the process dies in the sweep, after the batch's own rows
            return m.encode(op, key, position, data)

        with pytest.raises(OSError):
            commit(outbox, m, batch([("A", 1, "7"), ("C", 1, "3")], 2, complete=True), encode)
        assert calls == 3
        assert outbox.db.execute("SELECT * FROM keyed_state ORDER BY key").fetchall() == state
        assert outbox.position("shop") == "[1]"
        assert outbox.backlog() == 2

        redo = commit(outbox, m, batch([("A", 1, "7"), ("C", 1, "3")], 2, complete=True))
        assert [(e["type"], e["subject"]) for e in redo] == [
            ("item.upserted", "A/1"), ("item.upserted", "C/1"), ("item.deleted", "B/1"),
        ]
    finally:
        outbox.close()


def test_a_row_that_cannot_be_mapped_is_a_dead_letter_and_its_key_stays(tmp_path: Path) -> None:
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        commit(outbox, m, batch([("A", 1, "1"), ("B", 1, "2")], 1, complete=True))
        raw = batch([("A", 1, "one euro"), ("B", "x", "2")], 2, complete=True)
        mapped = m.map_keyed(raw, partial(outbox.digests, "shop"))
        assert [c.op for c in mapped.changes] == [SEEN]
        assert ["price" in d.reason for d in mapped.dead] == [True, False]
        outbox.append_keyed("shop", "s", mapped.changes, [(d.position, d.reason, d.raw) for d in mapped.dead],
                            raw.next_position, 2, complete=True, encode=m.encode)
        assert outbox.dead_letter_counts() == {"shop": 2}
        # A is still in the table, only unreadable: not deleted. B's key itself is unreadable: it is not seen.
        events = [orjson.loads(r.event) for r in outbox.events()]
        assert summary(events[2:]) == [("item.deleted", "B/1", {"sku": "B", "site": 1})]
        assert keyed.known_keys(outbox.db, "shop") == 1
        # The same unreadable row again: no new dead letter, nothing mapped; fixed, it is an event again.
        again = m.map_keyed(batch([("A", 1, "one euro")], 3), partial(outbox.digests, "shop"))
        assert (again.changes, [k for k, _i in again.unchanged], again.dead) == ([], ["A/1"], [])
        assert summary(commit(outbox, m, batch([("A", 1, "1.5")], 3, complete=True))) == [
            ("item.upserted", "A/1", {"sku": "A", "site": 1, "price": "1.50"})
        ]
    finally:
        outbox.close()


def test_append_keyed_counts_the_records_it_writes(tmp_path: Path) -> None:
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        first = batch([("A", 1, "1"), ("B", 1, "2"), ("C", 1, "3")], 1, complete=True)
        mapped = m.map_keyed(first, partial(outbox.digests, "shop"))
        assert outbox.append_keyed("shop", "s", mapped.changes, [], first.next_position, 3, complete=True,
                                   encode=m.encode) == 3
        second = batch([("A", 1, "9")], 2, complete=True)
        mapped = m.map_keyed(second, partial(outbox.digests, "shop"))
        assert outbox.append_keyed("shop", "s", mapped.changes, [], second.next_position, 1, complete=True,
                                   encode=m.encode) == 3  # A changed, B and C deleted
        assert outbox.backlog() == 6
    finally:
        outbox.close()


def test_keys_beyond_64_bits_stay_exact(tmp_path: Path) -> None:
    entity = EntitySpec.model_validate({"key": ["id"], "fields": {"id": "integer", "name": "string"}})
    m = Mapper(source_uri="straw/t/big", source_name="big", entity_name="item", entity=entity, mapping={}, zone=None)
    outbox = Outbox(tmp_path / "o.db")
    big = 2**70 + 1
    try:
        def listing(name: str, n: int) -> list[dict[str, Any]]:
            raw = RawBatch(("id", "name"), [(big, name)], [f"[{n},1]"], keyed=True, complete=True, end=f"[{n}]")
            mapped = m.map_keyed(raw, partial(outbox.digests, "big"))
            before = outbox.backlog()
            outbox.append_keyed("big", "s", mapped.changes, [], raw.next_position, 1, complete=True,
                                encode=m.encode, unchanged=[i for _k, i in mapped.unchanged])
            # json, not orjson: orjson would read the big integer as a float
            return [json.loads(r.event) for r in outbox.events()[before:]]

        assert summary(listing("a", 1)) == [("item.upserted", str(big), {"id": big, "name": "a"})]
        assert listing("a", 2) == []
        assert summary(listing("b", 3)) == [("item.upserted", str(big), {"id": big, "name": "b"})]
    finally:
        outbox.close()


def test_an_outbox_from_before_key_ids_keeps_its_keys(tmp_path: Path) -> None:
    """The keyed state of an older outbox (one row mark per key) is carried over when it is opened."""
    path = tmp_path / "o.db"
    m = mapper()
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript("""
        CREATE TABLE keyed_state (source TEXT NOT NULL, key TEXT NOT NULL, key_data TEXT NOT NULL,
            hash BLOB NOT NULL, data_hash BLOB NOT NULL, gen INTEGER NOT NULL, PRIMARY KEY (source, key)) WITHOUT ROWID;
        CREATE TABLE keyed_sources (source TEXT PRIMARY KEY, gen INTEGER NOT NULL);
        INSERT INTO keyed_sources VALUES ('shop', 4);
    """)
    # What the old code stored for A/1 and B/1, minus the raw digest (a new digest is only a re-read: no event).
    for sku, price in (("A", "9.99"), ("B", "5.00")):
        data = {"sku": sku, "site": 1, "price": price}
        key_data = json.dumps({"sku": sku, "site": 1}, separators=(",", ":"))
        old.execute("INSERT INTO keyed_state VALUES ('shop', ?, ?, x'00', ?, 3)",
                    (f"{sku}/1", key_data, content_hash(data)))
    old.close()

    outbox = Outbox(path)
    try:
        assert keyed.known_keys(outbox.db, "shop") == 2
        events = commit(outbox, m, batch([("A", 1, "9.99")], 4, complete=True))
        # A is the same record as delivered before: no event; B vanished: deleted.
        assert summary(events) == [("item.deleted", "B/1", {"sku": "B", "site": 1})]
        assert summary(commit(outbox, m, batch([("A", 1, "9.99")], 5, complete=True))) == []
    finally:
        outbox.close()


def test_a_long_listing_finds_keys_in_and_out_of_their_first_order(tmp_path: Path) -> None:
    """Batches of 64 keys and more read their stored digests as one run of ids; new and moved keys still match."""
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    rows = [(f"K{i:03}", 1, "1.00") for i in range(200)]
    try:
        assert len(commit(outbox, m, batch(rows, 1, complete=True))) == 200
        second = [r for r in rows if r[0] != "K050"]
        second[99] = ("K100", 1, "2.00")
        second.insert(50, ("K050b", 1, "1.00"))  # new: its id comes after every other
        events = commit(outbox, m, batch(second, 2, complete=True))
        assert summary(events) == [
            ("item.upserted", "K050b/1", {"sku": "K050b", "site": 1, "price": "1.00"}),
            ("item.upserted", "K100/1", {"sku": "K100", "site": 1, "price": "2.00"}),
            ("item.deleted", "K050/1", {"sku": "K050", "site": 1}),
        ]
        assert commit(outbox, m, batch(second, 3, complete=True)) == []  # K050b is found outside the run
        assert commit(outbox, m, batch(second[::-1], 4, complete=True)) == []  # a reversed listing: one by one
    finally:
        outbox.close()


def test_a_one_field_key_that_cannot_be_read_is_a_dead_letter(tmp_path: Path) -> None:
    entity = EntitySpec.model_validate({"key": ["no"], "fields": {"no": "integer", "name": "string"}})
    m = Mapper(source_uri="straw/t/shop", source_name="shop", entity_name="item", entity=entity, mapping={},
               zone=None)
    raw = RawBatch(("no", "name"), [(1, "a"), ("x", "b"), (None, "c"), (3, "d")], ["1", "2", "3", "4"], keyed=True)
    outbox = Outbox(tmp_path / "o.db")
    try:
        mapped = m.map_keyed(raw, partial(outbox.digests, "shop"))
    finally:
        outbox.close()
    assert [c.key for c in mapped.changes] == ["1", "3"]
    assert [d.position for d in mapped.dead] == ["2", "3"]


def _plan(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> str:
    return " / ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_the_sweep_and_the_digest_lookups_use_their_indexes(tmp_path: Path) -> None:
    """A million-key listing lives on these plans: the key lookups by the primary key, the runs by id.

    (An `ORDER BY id` on the sweep's `key IN (…)` lookup made SQLite walk the id index: 10x slower.)
    """
    outbox, m = Outbox(tmp_path / "o.db"), mapper()
    try:
        commit(outbox, m, batch([(f"s{i}", 1, "1.00") for i in range(200)], 1))
        db = outbox.db  # no ANALYZE: the outbox never runs one, and without statistics the planner guesses
        keys = ("s1", "s2", "s3")
        assert "USING PRIMARY KEY (source=? AND key=?)" in _plan(db, keyed.sweep_lookup(3), ("shop", *keys))
        assert "USING PRIMARY KEY (source=? AND key=?)" in _plan(db, keyed.KNOWN_LOOKUP.format(marks="?,?,?"),
                                                               ("shop", *keys))
        assert "COVERING INDEX keyed_state_ids (source=? AND id>? AND id<?)" in _plan(
            db, keyed.DIGEST_RUN, ("shop", 1, 100))
        scan = _plan(db, keyed.SWEEP_SCAN, ("shop",))
        assert "COVERING INDEX keyed_state_ids (source=?)" in scan and "TEMP B-TREE" not in scan
    finally:
        outbox.close()
