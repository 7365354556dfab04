"""Raw row -> canonical record, as the configuration says.

A mapper is compiled once per source and column list into a flat list of
(field, column index, coercer), so the per-row work is one loop without lookups.
Rows that fail go to dead letters with the reason; the batch goes on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from hashlib import blake2b
from operator import itemgetter
from typing import Any

import orjson
import structlog

from outbox.keyed import SEEN, Change
from straw.coerce import Coercer, Unreadable, coercer, unchanged_type
from straw.config import EntitySpec
from straw.records import DELETED, UPSERTED, Envelope, observed_now, subject, subject_part
from straw.source import RawBatch, database_digest

log = structlog.get_logger("straw.mapping")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    position: str
    reason: str
    raw: str  # the raw row as JSON text, every column


@dataclass(slots=True)
class MappedBatch:
    events: list[tuple[str, bytes]] = field(default_factory=list)  # (position, encoded event)
    dead: list[DeadLetter] = field(default_factory=list)


@dataclass(slots=True)
class KeyedBatch:
    changes: list[Change] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    # (key, id) of each key listed again as delivered: not even mapped, only recorded as seen
    unchanged: list[tuple[str, int]] = field(default_factory=list)
    # ids of more such keys, found by their database digest alone (their keys were never built)
    unchanged_ids: list[int] = field(default_factory=list)


# key -> (id, digest) of what was delivered before, for the known keys of one batch
Stored = Callable[[list[str]], Mapping[str, tuple[int, bytes]]]
# (keys at a page's ends, the page's database digests) -> the id of the stored key with each digest, or None
ByDigest = Callable[[list[str], Sequence[bytes | None]], list[int | None]]
_ENDS = 4  # rows at each end of a digest page whose keys bound its run of stored ids
_NOT_KNOWN = (0, b"")


def content_hash(data: dict[str, Any]) -> bytes:
    """The canonical data's hash, keys sorted: a new raw form of the same data is no event."""
    return blake2b(_dumps(data, sort=True), digest_size=16).digest()


def _dumps(data: dict[str, Any], sort: bool = False) -> bytes:
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS if sort else None)
    except TypeError:  # integers beyond 64 bits
        return json.dumps(data, default=str, sort_keys=sort, separators=(",", ":")).encode()


def _raw_bytes(values: tuple[Any, ...]) -> bytes:
    try:
        return orjson.dumps(values, default=_raw_default)
    except TypeError:  # integers beyond 64 bits, lone surrogates
        return _json_text(list(map(_raw_safe, values))).encode()


def _without_digests(batch: RawBatch) -> RawBatch:
    return RawBatch(batch.columns, batch.rows, batch.positions, batch.ops, keyed=batch.keyed,
                    complete=batch.complete, end=batch.end)


def _subset(batch: RawBatch, indexes: Sequence[int]) -> RawBatch:
    ops = batch.ops
    return RawBatch(
        batch.columns,
        [batch.rows[i] for i in indexes],
        [batch.positions[i] for i in indexes],
        None if ops is None else [ops[i] for i in indexes],
        keyed=batch.keyed,
        complete=batch.complete,
        end=batch.next_position,
        digests=None if batch.digests is None else [batch.digests[i] for i in indexes],
    )


class MappingError(Exception):
    """The source's columns cannot serve the entity: a configuration or schema-drift problem."""


@dataclass(frozen=True, slots=True)
class _Plan:
    names: tuple[str, ...]
    pick: Callable[[Sequence[Any]], tuple[Any, ...]]  # the mapped columns of a row, in field order
    coercers: tuple[Coercer, ...]
    required: tuple[int, ...]  # indexes (into names) that must not be null
    key: tuple[int, ...]  # indexes (into names) of the key fields
    whole: bool = False  # the mapped columns are the row's, in order: `pick` would copy each row as it is
    unchanged: tuple[type | None, ...] = ()  # per field: the exact type its coercer returns as it is


class Mapper:
    def __init__(
        self,
        *,
        source_uri: str,
        source_name: str,
        entity_name: str,
        entity: EntitySpec,
        mapping: dict[str, str],
        zone: Any,
        encoding: str = "utf-8",
        trim: bool = False,
    ) -> None:
        self.source_uri = source_uri
        self.source_name = source_name
        self.entity_name = entity_name
        self.entity = entity
        self.columns_for = {name: mapping.get(name, name) for name in entity.fields}
        self._coercers = {name: coercer(spec, zone, encoding, trim) for name, spec in entity.fields.items()}
        self._trim = trim
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._envelopes: dict[tuple[str, str], Envelope] = {}
        self._key_names = tuple(entity.key)
        # Digests are keyed by everything that shapes a canonical record: change the mapping, and every row is new.
        shape = orjson.dumps([entity.model_dump(mode="json"), self.columns_for, str(zone), encoding, trim])
        self._digest_base = blake2b(blake2b(shape, digest_size=32).digest(), digest_size=16)  # copied per row
        # The same shape for a digest the database computes (adapters/db/digest.py salts it with this).
        self.shape_id = blake2b(shape, digest_size=16).hexdigest()
        self._switch_noted = False  # the source's stored digests are of the other kind: said once

    def required_columns(self) -> list[str]:
        return list(dict.fromkeys(self.columns_for.values()))

    def key_columns(self) -> list[str]:
        """The source columns of the entity key, in key order."""
        return [self.columns_for[k] for k in self.entity.key]

    def _plan(self, columns: tuple[str, ...]) -> _Plan:
        plan = self._plans.get(columns)
        if plan is not None:
            return plan
        index = {c: i for i, c in enumerate(columns)}
        lower = {c.lower(): i for i, c in enumerate(columns)}
        slots = []
        for name, column in self.columns_for.items():
            found = index.get(column, lower.get(column.lower()))
            if found is None:
                raise MappingError(
                    f"source {self.source_name!r}: column {column!r} (for field {name!r}) is not in the result "
                    f"(columns: {', '.join(columns)}); fix `mapping` or the legacy schema"
                )
            slots.append(found)
        names = tuple(self.columns_for)
        fields = self.entity.fields
        pick = itemgetter(*slots) if len(slots) > 1 else (lambda row, i=slots[0]: (row[i],))
        plan = _Plan(
            names=names,
            pick=pick,
            coercers=tuple(self._coercers[n] for n in names),
            required=tuple(i for i, n in enumerate(names) if fields[n].required or n in self.entity.key),
            key=tuple(names.index(k) for k in self.entity.key),
            whole=slots == list(range(len(columns))),
            unchanged=tuple(unchanged_type(fields[n], self._trim) for n in names),
        )
        self._plans[columns] = plan
        return plan

    def map(self, batch: RawBatch, time: str | None = None) -> MappedBatch:
        """Every row becomes an event (incremental sources)."""
        out = MappedBatch()
        observed = time or observed_now()
        names, key_names = self._plan(batch.columns).names, self._key_names
        upserted = self._envelope(UPSERTED, observed).encode
        deleted = self._envelope(DELETED, observed).encode
        events = out.events
        fast = self._columns(batch) if batch.ops is None else None
        if fast is not None:
            keys, rows = fast
            try:
                # No strict= on the inner zip: `_columns` made one column per name, so each row has len(names).
                out.events = [
                    (position, upserted(key, position, dict(zip(names, values, strict=False))))
                    for position, key, values in zip(batch.positions, keys, rows, strict=True)
                ]
                return out
            except Exception:  # a value that cannot be encoded: row by row below finds it
                pass
        for index, position, op, key, values in self._decode(batch, out.dead):
            try:
                if op == DELETED:
                    events.append((position, deleted(key, position, dict(zip(key_names, values, strict=True)))))
                else:
                    events.append((position, upserted(key, position, dict(zip(names, values, strict=True)))))
            except Exception as exc:
                row = batch.rows[index]
                out.dead.append(DeadLetter(position, f"cannot encode the event: {_why(exc)}",
                                           raw_json(batch.columns, row)))
        return out

    def map_keyed(self, batch: RawBatch, stored: Stored | None = None, by_digest: ByDigest | None = None
                  ) -> KeyedBatch:
        """Rows as keyed changes, compared with earlier deliveries by the outbox (see outbox/keyed.py).

        A row's digest covers its raw values (the mapped columns, as read) and its op,
        keyed by this mapper's configuration, so a changed mapping re-sends everything
        once. `stored` (key -> id and digest delivered before, e.g. `Outbox.digests`):
        rows whose digest is unchanged skip mapping altogether and are only listed in
        `unchanged`; in a listing that is nearly every row, and mapping is the costly part.
        `by_digest` (e.g. `Outbox.by_digest`): a digest listing's rows whose database digest is stored
        as it is, found without their keys.
        """
        if batch.fetch is not None:
            return self._map_listed(batch, stored, by_digest)
        out = KeyedBatch()
        plan = self._plan(batch.columns)
        keys, digests = self._scan(plan, batch)
        twice: dict[str, list[tuple[str, Sequence[Any], bytes]]] = {}
        if len(set(keys)) < len(keys):  # a key listed more than once (or several unreadable ones)
            batch, keys, digests, twice = self._split_duplicates(batch, keys, digests)
        if twice:
            self._duplicates(out, plan, batch.columns, twice, stored)
        if stored is not None:
            known = stored([k for k in keys if k is not None])
            before = [known.get(k, _NOT_KNOWN) if k is not None else _NOT_KNOWN for k in keys]
            if not self._switch_noted and batch.digests is None and any(database_digest(b[1]) for b in before):
                self._note_switch("the database's", "Python")
            changed = [i for i, (b, d) in enumerate(zip(before, digests, strict=True)) if b[1] != d]
            if len(changed) < len(batch.rows):
                skip = set(changed)
                out.unchanged += [(k, before[i][0]) for i, k in enumerate(keys) if k is not None and i not in skip]
                batch = _subset(batch, changed)
                digests = [digests[i] for i in changed]
        names, key_names = plan.names, self._key_names
        fast = self._columns(batch) if batch.ops is None else None
        if fast is not None:  # every row new or changed, as in a first listing
            for index, (position, key, row) in enumerate(zip(batch.positions, *fast, strict=True)):
                data = dict(zip(names, row, strict=True))
                key_data = {k: data[k] for k in key_names}
                try:
                    change = Change(key, _dumps(key_data).decode(), digests[index],
                                    self._checked_hash(key, position, data), UPSERTED, position, data)
                except Exception as exc:
                    self._unencodable(out, batch, index, exc, key, key_data, digests[index])
                    continue
                out.changes.append(change)
            return out
        for index, position, op, key, values in self._decode(batch, out.dead, keyed=True):
            if op != UPSERTED:
                data = dict(zip(key_names, values, strict=True))
                key_data = data
            else:
                data = dict(zip(names, values, strict=True))
                key_data = {k: data[k] for k in key_names}
            try:
                data_digest = self._checked_hash(key, position, data) if op == UPSERTED else b""
                change = Change(key, _dumps(key_data).decode(), digests[index], data_digest, op, position, data)
            except Exception as exc:
                self._unencodable(out, batch, index, exc, key, key_data if op == UPSERTED else None, digests[index])
                continue
            out.changes.append(change)
        return out

    def _map_listed(self, batch: RawBatch, stored: Stored | None, by_digest: ByDigest | None) -> KeyedBatch:
        """A digest listing (keys and the database's digests): only new and changed keys are read in full.

        Rows whose digest the outbox holds as it is (`by_digest`) are unchanged without more ado; the
        others (a few: new, changed, deleted since, or outside the page's run of ids) are compared key
        by key.
        """
        fetch, digests = batch.fetch, batch.digests
        assert fetch is not None and digests is not None
        rows = batch.rows
        unchanged: list[tuple[str, int]] = []
        ids: list[int] = []
        rest: Sequence[int] = range(len(rows))
        if by_digest is not None and stored is not None and len(rows) > 2 * _ENDS:
            ends = [k for k in self._subjects(batch, [*rows[:_ENDS], *rows[-_ENDS:]]) if k is not None]
            found = by_digest(ends, digests)
            ids = [id_ for id_ in found if id_ is not None]
            rest = [i for i, id_ in enumerate(found) if id_ is None] if len(ids) < len(found) else []
        keys = self._subjects(batch, [rows[i] for i in rest])
        known = stored([k for k in keys if k is not None]) if stored is not None and keys else {}
        get = known.get
        changed: list[int] = []
        other = 0  # stored digests of the Python kind
        for index, key in zip(rest, keys, strict=True):
            digest = digests[index]
            before = get(key) if key is not None else None
            if before is not None and digest is not None and before[1] == digest:
                unchanged.append((key, before[0]))  # type: ignore[arg-type]
            else:
                changed.append(index)
                other += before is not None and digest is not None and not database_digest(before[1])
        if other and not self._switch_noted:
            self._note_switch("Python", "the database's")
        if not changed:
            return KeyedBatch(unchanged=unchanged, unchanged_ids=ids)
        out = self.map_keyed(fetch(changed), stored)  # a key gone since is not in it: the listing's end deletes it
        out.unchanged[:0] = unchanged
        out.unchanged_ids = ids
        return out

    def _note_switch(self, was: str, now: str) -> None:
        self._switch_noted = True
        log.warning(
            "snapshot digests changed kind: this listing reads and maps every row once, and sends only rows "
            "whose data changed", source=self.source_name, stored=was, now=now,
        )

    def _subjects(self, batch: RawBatch, rows: Sequence[Sequence[Any]] | None = None) -> list[str | None]:
        """Each row's entity key as text, from the key columns wherever they are in it (None: unreadable).

        `rows`: these rows, of `batch`'s columns (default: the batch's).
        """
        rows = batch.rows if rows is None else rows
        slots = [self._slot(batch.columns, self.columns_for[k]) for k in self._key_names]
        coercers = [self._coercers[k] for k in self._key_names]
        keys: list[str | None] = []
        if len(slots) == 1:
            slot, convert = slots[0], coercers[0]
            for row in rows:
                try:
                    keys.append(None if (value := convert(row[slot])) is None else subject_part(value))
                except Exception:  # the row's dead letter says why, when its full row is mapped
                    keys.append(None)
            return keys
        pairs = list(zip(coercers, slots, strict=True))
        for row in rows:
            try:
                values = tuple(c(row[s]) for c, s in pairs)
                keys.append(None if None in values else subject(values))
            except Exception:
                keys.append(None)
        return keys

    def _slot(self, columns: tuple[str, ...], column: str) -> int:
        if column in columns:
            return columns.index(column)
        lower = [c.lower() for c in columns]
        if column.lower() not in lower:
            raise MappingError(
                f"source {self.source_name!r}: key column {column!r} is not in the result (columns: "
                f"{', '.join(columns)}); fix `mapping` or the legacy schema"
            )
        return lower.index(column.lower())

    def _split_duplicates(
        self, batch: RawBatch, keys: list[str | None], digests: list[bytes]
    ) -> tuple[RawBatch, list[str | None], list[bytes], dict[str, list[tuple[str, Sequence[Any], bytes]]]]:
        """The batch without the rows of keys it lists more than once, and those (position, row, digest) by key."""
        where: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            if key is not None:
                where.setdefault(key, []).append(index)
        twice = {key: found for key, found in where.items() if len(found) > 1}
        if not twice:
            return batch, keys, digests, {}
        keep = [i for i, key in enumerate(keys) if key not in twice]
        rows = {key: [(batch.positions[i], batch.rows[i], digests[i]) for i in found] for key, found in twice.items()}
        return _subset(batch, keep), [keys[i] for i in keep], [digests[i] for i in keep], rows

    def _duplicates(
        self, out: KeyedBatch, plan: _Plan, columns: tuple[str, ...],
        rows: dict[str, list[tuple[str, Sequence[Any], bytes]]], stored: Stored | None,
    ) -> None:
        """A key listed twice in one listing: which row is the entity? Neither is sent.

        One dead letter names the key, and the key is kept alive (op SEEN) with a digest of
        all its rows, so an unchanged pair is not a dead letter again at the next listing.
        """
        known = stored(list(rows)) if stored is not None else {}
        key_slots = plan.key
        for key in rows:
            found = rows[key]
            digest = blake2b(b"".join(d for _p, _r, d in found), digest_size=16).digest()
            before = known.get(key)
            if before is not None and before[1] == digest:
                out.unchanged.append((key, before[0]))
                continue
            position, row = found[0][0], found[0][1]
            out.dead.append(DeadLetter(
                position,
                f"key {key!r} is listed {len(found)} times in one listing (no unique key?): none of its rows is sent "
                "until it is listed once",
                orjson.dumps([orjson.loads(raw_json(columns, r)) for _p, r, _d in found]).decode(),
            ))
            picked = plan.pick(row)
            try:
                key_data = {self._key_names[n]: plan.coercers[i](picked[i]) for n, i in enumerate(key_slots)}
                out.changes.append(Change(key, _dumps(key_data).decode(), digest, b"", SEEN, position, {}))
            except Exception:  # the key read once already: this cannot fail, but a key is not worth a crash
                continue

    def _checked_hash(self, key: str, position: str, data: dict[str, Any]) -> bytes:
        """The content hash of data that the outbox will be able to encode as an event."""
        try:
            return blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
        except TypeError:
            # Encoded later, inside the outbox's transaction, where a failure would stop the batch: try it here.
            self.encode(UPSERTED, key, position, data, "")
            return content_hash(data)

    def _unencodable(
        self, out: KeyedBatch, batch: RawBatch, index: int, exc: Exception, key: str,
        key_data: dict[str, Any] | None, digest: bytes,
    ) -> None:
        """A keyed row whose values coerce but cannot go on the wire: a dead letter, its key kept alive."""
        position = batch.positions[index]
        out.dead.append(DeadLetter(position, f"cannot encode the event: {_why(exc)}",
                                   raw_json(batch.columns, batch.rows[index])))
        if key_data is None:
            return
        with contextlib.suppress(Exception):  # a key that cannot be encoded cannot be kept either
            out.changes.append(Change(key, _dumps(key_data).decode(), digest, b"", SEEN, position, {}))

    def key_subjects(self, rows: Sequence[Sequence[Any]]) -> list[str | None]:
        """Rows of raw key values (in key order) as the subjects this source's events carry them under.

        None where a value cannot be read: such a row was never delivered either.
        """
        convert = [self._coercers[k] for k in self._key_names]
        if len(convert) == 1:  # the common case, over the whole column in C: a sweep lists a million keys
            try:
                column = list(map(convert[0], map(itemgetter(0), rows)))
            except Exception:  # a coercer may raise more than ValueError (a dead letter's reason)
                column = [None]  # a value that cannot be read: row by row below finds which
            if None not in column:
                return list(map(subject_part, column))
        out: list[str | None] = []
        for row in rows:
            try:
                values = tuple(c(v) for c, v in zip(convert, row, strict=True))
            except Exception:  # a coercer may raise more than ValueError (a dead letter's reason)
                out.append(None)
                continue
            out.append(None if None in values else subject(values))
        return out

    def _scan(self, plan: _Plan, batch: RawBatch) -> tuple[list[str | None], list[bytes]]:
        """Each row's key as text (None when its key fields cannot be read) and raw digest, in one pass.

        A listing scans every row: the common cases (no ops, one key field) get a loop
        of their own, a tenth faster than the general one.
        """
        pick, base, ops = plan.pick, self._digest_base, batch.ops
        keys: list[str | None] = []
        digests: list[bytes] = []
        if batch.digests is not None:  # the database's (the rows were fetched by key)
            given = batch.digests
            if None in given:  # it could not digest some row: a Python digest for those
                keys, python = self._scan(plan, _without_digests(batch))
                return keys, [d if d is not None else p for d, p in zip(given, python, strict=True)]
            return self._subjects(batch), list(given)  # type: ignore[arg-type]  # no None in it
        if ops is None and len(plan.key) == 1:
            slot = plan.key[0]
            convert = plan.coercers[slot]
            for values in map(pick, batch.rows):
                digest = base.copy()
                digest.update(_raw_bytes(values))
                digests.append(digest.digest())
                try:
                    keys.append(None if (value := convert(values[slot])) is None else subject_part(value))
                except Exception:  # any failure of any value is the row's dead letter, found when it is mapped
                    keys.append(None)
            return keys, digests
        key_coercers = [(plan.coercers[i], i) for i in plan.key]
        for index, row in enumerate(batch.rows):
            values = pick(row)
            digest = base.copy()
            digest.update(_raw_bytes(values if ops is None else (*values, ops[index])))
            digests.append(digest.digest())
            try:
                key_values = tuple(c(values[i]) for c, i in key_coercers)
                keys.append(None if None in key_values else subject(key_values))
            except Exception:
                keys.append(None)
        return keys, digests

    def encode(self, op: str, key: str, position: str, data: dict[str, Any], time: str | None = None) -> bytes:
        return self._envelope(op, time or observed_now()).encode(key, position, data)

    def _envelope(self, op: str, time: str) -> Envelope:
        found = self._envelopes.get((op, time))
        if found is None:
            if len(self._envelopes) > 8:  # one observation time per batch: old ones are not asked for again
                self._envelopes.clear()
            found = self._envelopes[(op, time)] = Envelope(
                source=self.source_uri, entity=self.entity_name, op=op, time=time
            )
        return found

    def _columns(self, batch: RawBatch) -> tuple[list[str], Iterator[tuple[Any, ...]]] | None:
        """Keys and values (an iterator: each row once) of a batch of upserts, coerced column by column;
        None if any row is dead.

        `map` over a column calls its coercer from C: a third cheaper than a comprehension
        per row. A batch with a row that cannot be mapped goes row by row (`_decode`),
        which finds it and says why.
        """
        plan = self._plan(batch.columns)
        if not batch.rows or len(plan.key) != 1:
            return None
        columns: list[Sequence[Any]] = []
        # Rows that hold just the mapped columns, in order, are transposed as they are: a quarter µs a row less.
        picked = batch.rows if plan.whole else map(plan.pick, batch.rows)
        try:
            for convert, kind, column in zip(plan.coercers, plan.unchanged, zip(*picked, strict=True), strict=True):
                if kind is not None and set(map(type, column)) == {kind}:  # the coercer would return each as is
                    columns.append(column)
                elif None in column:
                    columns.append([None if v is None else convert(v) for v in column])
                else:
                    columns.append(list(map(convert, column)))
            if any(None in columns[i] for i in plan.required):
                return None
            # The rows as the consumer takes them, not a list of tuples kept alive for the whole batch.
            return list(map(subject_part, columns[plan.key[0]])), zip(*columns, strict=True)
        except Exception:  # any failure, of any kind: row by row finds the row and says why
            return None

    def _decode(
        self, batch: RawBatch, dead: list[DeadLetter], keyed: bool = False
    ) -> Iterator[tuple[int, str, str, str, list[Any]]]:
        """(row index, position, op, key, values) per mappable row; the others go to `dead`.

        A deleted row's values are its key fields only: the rest of a deleted row is
        often left in any state, and the event carries only the key. `keyed`: a dead
        row whose key is readable is also yielded, as op SEEN with its key values.
        """
        plan = self._plan(batch.columns)
        pick, coercers, required, key_slots = plan.pick, plan.coercers, plan.required, plan.key
        key_coercers = [coercers[i] for i in key_slots]
        ops = batch.ops
        for index, (row, position) in enumerate(zip(batch.rows, batch.positions, strict=True)):
            op = UPSERTED if ops is None else ops[index]
            # The hot loop: one comprehension per row; only a failing row pays for a precise reason.
            picked = pick(row)
            try:
                if op == DELETED:
                    values = [None if picked[i] is None else c(picked[i]) for c, i in zip(key_coercers, key_slots,
                                                                                       strict=True)]
                    failed = any(v is None for v in values)
                    key_values = values
                else:
                    values = [None if v is None else c(v) for c, v in zip(coercers, picked, strict=False)]
                    failed = any(values[i] is None for i in required)
                    key_values = [values[i] for i in key_slots]
                key = "" if failed else subject(tuple(key_values))
            except Exception:  # any exception of any coercer: the row's dead letter, never the batch's end
                failed = True
            if failed:
                dead.append(DeadLetter(position, self._reason(plan, row, op), raw_json(batch.columns, row)))
                if keyed and op != DELETED:
                    # The row is still there, only unreadable: its key must not look deleted to the listing.
                    try:
                        key_values = [c(picked[i]) for c, i in zip(key_coercers, key_slots, strict=True)]
                        if all(v is not None for v in key_values):
                            key = subject(tuple(key_values))
                        else:
                            continue
                    except Exception:
                        continue
                    yield index, position, SEEN, key, key_values
                continue
            yield index, position, op, key, values

    def _reason(self, plan: _Plan, row: Sequence[Any], op: str = UPSERTED) -> str:
        """Why this row cannot be mapped: the first field that fails, named with its column."""
        for i, (name, coerce, value) in enumerate(zip(plan.names, plan.coercers, plan.pick(row), strict=True)):
            if op == DELETED and i not in plan.key:
                continue
            column = self.columns_for[name]
            if value is None:
                if i in plan.required:
                    return f"field {name!r} (column {column!r}) is null"
                continue
            try:
                coerced = coerce(value)
            except Exception as exc:
                return f"field {name!r} (column {column!r}): {_why(exc)}"
            if coerced is None and i in plan.required:
                return f"field {name!r} (column {column!r}) is JSON null"
        return "row cannot be mapped"


def raw_json(columns: tuple[str, ...], row: Any) -> str:
    """The raw row kept for the dead-letter table: every column, nothing lost to JSON.

    NaN and ±Infinity as the strings "NaN", "Infinity", "-Infinity" (JSON has no such
    numbers; orjson would write null); any value at all: this must never fail.
    """
    values = dict(zip(columns, map(_raw_safe, row), strict=False))
    try:
        return orjson.dumps(values, default=_raw_default).decode()
    except TypeError:  # integers beyond 64 bits, lone surrogates
        return _json_text(values)


def _json_text(value: Any) -> str:
    # ensure_ascii escapes lone surrogates; _raw_safe has made every number printable
    return json.dumps(value, default=_raw_default, separators=(",", ":"), allow_nan=False)


def _raw_safe(value: Any) -> Any:
    if type(value) is float:
        if value != value:
            return "NaN"
        if value in (_INF, -_INF):
            return "Infinity" if value > 0 else "-Infinity"
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        try:
            return int(str(value))  # printable in decimal: kept as a number
        except ValueError:  # beyond Python's digit limit for decimal text
            return {"$int_hex": hex(value)}
    if isinstance(value, Decimal) and not value.is_finite():
        return str(value)
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: no JSON reader takes them; show them escaped
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, (list, tuple)):
        return [_raw_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _raw_safe(v) for k, v in value.items()}
    return value


_INF = float("inf")


def _why(exc: Exception) -> str:
    """An exception as one readable line: ValueErrors are ours and say it all; others are named."""
    if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__




def _raw_default(value: Any) -> Any:
    if isinstance(value, Unreadable):
        return {"$unreadable": _raw_safe(value.text)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes_hex": bytes(value).hex()}
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.date, dt.time, dt.timedelta)):
        return str(value)
    return repr(value)
