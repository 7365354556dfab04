"""Dead letters of both ends through `straw dlq`, replay after a restore, and two loaders in one group."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
import redis
import yaml
from sqlalchemy import MetaData, create_engine, delete, text, update

from bus.redis import RedisBus
from fixtures.legacy_orders import order_rows
from straw.local_redis import free_port
from tests.crashes import REPO, straw_command
from tests.helpers import dead_letters, orders_config, read_stream, run_once
from tests.loader_helpers import order_data, xadd_events
from tests.test_cli import invoke
from tests.test_dead_letters import fill_loose_orders, loose_orders
from tests.test_loader_sql import applied_seq, load_once, rows, sql_loader


def test_a_poison_record_is_dead_lettered_the_rest_applied_and_retry_applies_it_once_fixed(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, pg_url: str
) -> None:
    config = sql_loader(tmp_path, redis_url, stream_name, pg_url, max_deliveries=2)
    xadd_events(redis_client, stream_name, [("upserted", order_data(1))])
    load_once(config)
    engine = create_engine(pg_url)
    with engine.begin() as conn:  # the target is stricter than the entity: a constraint violation waits
        conn.execute(text("ALTER TABLE orders ALTER COLUMN note TYPE varchar(10)"))
    changes = [("upserted", order_data(n, note="a long note that does not fit" if n == 4 else None))
               for n in range(2, 7)]
    xadd_events(redis_client, stream_name, changes, first_seq=2)
    tally = load_once(config)
    assert tally.dead_letters == 1
    assert sorted(rows(pg_url)) == [1, 2, 3, 5, 6]  # the records behind the poison were applied
    listed = invoke("dlq", "list", "-c", str(config))
    assert listed.exit_code == 0, listed.output
    [item] = re.findall(rf"({re.escape(stream_name)}\.dlq:\d+-\d+)", listed.output)
    shown = invoke("dlq", "show", item, "-c", str(config))
    assert "value too long" in shown.output and '"order_no":4' in shown.output and "deliveries: 2" in shown.output
    with engine.begin() as conn:  # the operator fixes the target...
        conn.execute(text("ALTER TABLE orders ALTER COLUMN note TYPE text"))
    engine.dispose()
    retried = invoke("dlq", "retry", item, "-c", str(config))  # ...and sends the record through again
    assert retried.exit_code == 0 and "sent back" in retried.output, retried.output
    assert redis_client.xlen(f"{stream_name}.dlq") == 0
    load_once(config)
    assert rows(pg_url)[4]["note"] == "a long note that does not fit"
    assert applied_seq(pg_url, stream_name) == 6


def test_a_retried_record_never_overwrites_a_newer_change_of_its_key(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, sqlite_url: str
) -> None:
    config = sql_loader(tmp_path, redis_url, stream_name, sqlite_url)
    xadd_events(redis_client, stream_name, [("upserted", order_data(1, status="OLD"))])
    original = {k.decode(): v for k, v in redis_client.xrange(stream_name)[0][1].items()}
    redis_client.xadd(f"{stream_name}.dlq", {**original, "stream": stream_name, "group": "wh", "error": "x"})
    redis_client.xtrim(stream_name, maxlen=0)
    xadd_events(redis_client, stream_name, [("upserted", order_data(1, status="NEW"))], first_seq=2)
    load_once(config)
    [entry_id] = [e.decode() for e, _ in redis_client.xrange(f"{stream_name}.dlq")]
    assert invoke("dlq", "retry", f"{stream_name}.dlq:{entry_id}", "-c", str(config)).exit_code == 0
    load_once(config)
    assert rows(sqlite_url)[1]["status"] == "NEW"


def test_dlq_drop_asks_first(tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str,
                             sqlite_url: str) -> None:
    config = sql_loader(tmp_path, redis_url, stream_name, sqlite_url)
    entry = redis_client.xadd(f"{stream_name}.dlq", {"stream": stream_name, "error": "boom", "event": "{}"}).decode()
    item = f"{stream_name}.dlq:{entry}"
    from typer.testing import CliRunner

    from straw.cli import app

    answered_no = CliRunner().invoke(app, ["dlq", "drop", item, "-c", str(config)], input="n\n")
    assert answered_no.exit_code == 1 and redis_client.xlen(f"{stream_name}.dlq") == 1
    assert invoke("dlq", "drop", item, "-c", str(config), "--yes").exit_code == 0
    assert redis_client.xlen(f"{stream_name}.dlq") == 0
    missing = invoke("dlq", "show", "nonsense", "-c", str(config))
    assert missing.exit_code == 2 and "not an item" in missing.output


def test_a_mapping_dead_letter_is_re_mapped_with_todays_config(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    found = order_rows(3)
    found[1]["PAID"] = "maybe"  # not a boolean word
    fill_loose_orders(sqlite_url, found)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name)
    run_once(path)
    listed = invoke("dlq", "list", "-c", str(path))
    assert "outbox:1" in listed.output and "maybe" in invoke("dlq", "show", "outbox:1", "-c", str(path)).output
    still = invoke("dlq", "retry", "outbox:1", "-c", str(path))
    assert still.exit_code == 1 and "still cannot be mapped" in still.output
    document = yaml.safe_load(path.read_text())
    document["entities"]["order"]["fields"]["paid"] = "string"  # the fix: today's config takes it
    path.write_text(yaml.safe_dump(document))
    retried = invoke("dlq", "retry", "outbox:1", "-c", str(path))
    assert retried.exit_code == 0 and "queued" in retried.output, retried.output
    run_once(path)
    assert [e["event"]["subject"] for e in read_stream(redis_client, stream_name)] == ["1", "3", "2"]
    assert "outbox:1" not in invoke("dlq", "list", "-c", str(path)).output


def test_a_retried_mapping_dead_letter_keeps_the_checkpoint_at_the_watermark(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """The checkpoint takes each source's position from its last published record. A retried dead letter
    carried the position of its old row, so the checkpoint went back to it, and a replacement host (a fresh
    outbox starts at the checkpoint's positions) read and published every row after it a second time."""
    found = order_rows(4)
    found[1]["PAID"] = "maybe"
    fill_loose_orders(sqlite_url, found)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name)
    run_once(path)
    document = yaml.safe_load(path.read_text())
    document["entities"]["order"]["fields"]["paid"] = "string"
    path.write_text(yaml.safe_dump(document))
    assert invoke("dlq", "retry", "outbox:1", "-c", str(path)).exit_code == 0
    run_once(path)
    entries = read_stream(redis_client, stream_name)
    assert [e["event"]["subject"] for e in entries] == ["1", "3", "4", "2"]
    watermark = entries[2]["pos"]  # row 4's: where the source stands
    assert RedisBus(redis_client).checkpoint(stream_name).positions == {"orders": watermark}
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    document["outbox"]["path"] = str(replacement / "outbox.db")
    moved = replacement / "straw.yaml"
    moved.write_text(yaml.safe_dump(document))
    assert run_once(moved).errors == []
    assert [e["event"]["subject"] for e in read_stream(redis_client, stream_name)] == ["1", "3", "4", "2"]


def test_a_dead_letter_whose_row_changed_since_is_not_sent_over_its_later_version(
    tmp_path: Path, db_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    """Timestamp mode: `retry` sends the row as it was when it failed. Row 3 has changed since (its later
    version was delivered), row 4 is gone: sending either would put an older version after the newer one."""
    found = order_rows(5)
    for index in (1, 2, 3):
        found[index]["AMOUNT"] = None  # rows 2, 3 and 4: the required amount is missing
    fill_loose_orders(db_url, found)
    path = orders_config(tmp_path, db_url=db_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    assert run_once(path).errors == []
    letters = {orjson.loads(d["raw"])["ORDER_NO"]: f"outbox:{d['id']}" for d in dead_letters(tmp_path)}
    assert sorted(letters) == [2, 3, 4]
    engine = create_engine(db_url)
    table = loose_orders(MetaData())
    with engine.begin() as conn:
        later = found[4]["CHANGED_AT"] + dt.timedelta(hours=1)  # type: ignore[operator]
        conn.execute(update(table).where(table.c.ORDER_NO == 3).values(AMOUNT=Decimal("12.5"), CHANGED_AT=later))
        conn.execute(delete(table).where(table.c.ORDER_NO == 4))
    engine.dispose()
    assert run_once(path).errors == []
    document = yaml.safe_load(path.read_text())
    document["entities"]["order"]["fields"]["amount"] = {"type": "decimal", "scale": 2}  # the fix
    path.write_text(yaml.safe_dump(document))

    changed = invoke("dlq", "retry", letters[3], "-c", str(path))
    assert changed.exit_code == 1 and "changed since" in changed.output and "dlq drop" in changed.output, changed.output
    gone = invoke("dlq", "retry", letters[4], "-c", str(path))
    assert gone.exit_code == 1 and "no longer in the source" in gone.output, gone.output
    current = invoke("dlq", "retry", letters[2], "-c", str(path))
    assert current.exit_code == 0 and "queued" in current.output, current.output
    assert run_once(path).errors == []
    events = [e["event"] for e in read_stream(redis_client, stream_name)]
    assert [(e["subject"], e["data"]["amount"]) for e in events] == [
        ("1", str(found[0]["AMOUNT"])), ("5", str(found[4]["AMOUNT"])), ("3", "12.50"), ("2", None)]
    assert sorted(orjson.loads(d["raw"])["ORDER_NO"] for d in dead_letters(tmp_path)) == [3, 4]  # kept to drop


def test_a_retry_that_cannot_reach_the_source_says_so_in_one_line_without_the_password(
    tmp_path: Path, sqlite_url: str, redis_url: str, stream_name: str
) -> None:
    found = order_rows(2)
    found[1]["AMOUNT"] = None
    fill_loose_orders(sqlite_url, found)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="timestamp")
    assert run_once(path).errors == []
    document = yaml.safe_load(path.read_text())
    document["entities"]["order"]["fields"]["amount"] = {"type": "decimal", "scale": 2}
    document["sources"][0]["url"] = f"postgresql+psycopg://straw:Hunter2secret@127.0.0.1:{free_port()}/erp"
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    down = invoke("dlq", "retry", "outbox:1", "-c", str(path))
    assert down.exit_code == 1 and "could not ask 'orders' whether its row has changed" in down.output, down.output
    assert "Hunter2secret" not in down.output and "Traceback" not in down.output
    assert "retry once it answers" in down.output and len(dead_letters(tmp_path)) == 1  # kept: nothing sent


@pytest.mark.parametrize("fixed_at_source", [False, True])
def test_a_retried_dead_letter_of_a_snapshot_is_sent_once_and_never_over_a_later_version(
    tmp_path: Path, sqlite_url: str, redis_url: str, redis_client: redis.Redis, stream_name: str,
    fixed_at_source: bool,
) -> None:
    """A keyed source remembers what it delivered per key. The fix changes the mapping, so the next listing
    maps every row anew and sends row 2: the retry must not send it a second time. And where row 2 was fixed
    in the legacy system first (its later version delivered), the retry must not send the old version."""
    found = order_rows(3)
    found[1]["AMOUNT"] = None
    fill_loose_orders(sqlite_url, found)
    path = orders_config(tmp_path, db_url=sqlite_url, redis_url=redis_url, stream=stream_name, mode="snapshot")
    document = yaml.safe_load(path.read_text())
    for option in ("timestamp_column", "key_column"):
        document["sources"][0].pop(option)
    path.write_text(yaml.safe_dump(document))
    assert run_once(path).errors == []
    amount = None
    if fixed_at_source:
        engine = create_engine(sqlite_url)
        table = loose_orders(MetaData())
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.ORDER_NO == 2).values(AMOUNT=Decimal("5")))
        engine.dispose()
        assert run_once(path).errors == []
        amount = "5.00"
    document["entities"]["order"]["fields"]["amount"] = {"type": "decimal", "scale": 2}
    path.write_text(yaml.safe_dump(document))
    retried = invoke("dlq", "retry", "outbox:1", "-c", str(path))
    assert retried.exit_code == 0 and "the next listing" in retried.output, retried.output
    for _ in range(2):
        assert run_once(path).errors == []
    events = [e["event"] for e in read_stream(redis_client, stream_name)]
    assert [e["subject"] for e in events] == ["1", "3", "2"]
    assert events[-1]["data"]["amount"] == amount
    again = invoke("dlq", "retry", "outbox:1", "-c", str(path))
    assert again.exit_code == 2 and "no mapping dead letter" in again.output, again.output


def test_replay_after_restoring_an_old_backup_of_the_target(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str
) -> None:
    target = tmp_path / "target.db"
    config = sql_loader(tmp_path, redis_url, stream_name, f"sqlite:///{target}")
    xadd_events(redis_client, stream_name, [("upserted", order_data(n)) for n in range(1, 4)])
    load_once(config)
    shutil.copy(target, tmp_path / "backup.db")
    xadd_events(redis_client, stream_name, [("upserted", order_data(n, status="PAID")) for n in range(1, 7)],
                first_seq=4)
    load_once(config)
    shutil.copy(tmp_path / "backup.db", target)  # the target is restored from the old backup
    replayed = invoke("replay", "wh", "--from-seq", "2", "-c", str(config))
    assert replayed.exit_code == 0, replayed.output
    assert "replays from seq 2" in replayed.output
    got = rows(f"sqlite:///{target}")
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and {r["status"] for r in got.values()} == {"PAID"}
    assert applied_seq(f"sqlite:///{target}", stream_name) == 9
    bad = invoke("replay", "wh", "-c", str(config))
    assert bad.exit_code == 2 and "exactly one of" in bad.output


def test_two_loader_processes_in_one_group_share_the_work(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, stream_name: str, pg_url: str
) -> None:
    config = sql_loader(tmp_path, redis_url, stream_name, pg_url, batch_size=20, claim_idle="60s")
    redis_client.xgroup_create(stream_name, "wh", id="0", mkstream=True)
    procs = [subprocess.Popen(straw_command(config, "load", "wh", "--consumer", f"p{n}"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for n in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        while len(redis_client.xinfo_consumers(stream_name, "wh")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # both members wait in XREADGROUP before the records come
        last = xadd_events(redis_client, stream_name, [("upserted", order_data(n % 200 + 1, amount=f"{n}.00"))
                                                       for n in range(600)])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (redis_client.xpending(stream_name, "wh")["pending"]
                                               or _delivered(redis_client, stream_name) < last):
            time.sleep(0.1)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
    outputs = [proc.communicate(timeout=30)[0].decode() for proc in procs]
    counts = [int(re.search(r"wh: (\d+) applied", o).group(1)) for o in outputs]  # type: ignore[union-attr]
    assert all(c > 0 for c in counts) and sum(counts) == last, outputs  # each entry handed out, acked once
    # Both create the bookkeeping tables at their first batch; the one that loses the race tries again at once
    # (it used to leave its batch pending for `claim_idle`, a minute here).
    assert not any("not applied" in o for o in outputs), outputs
    got = rows(pg_url)
    assert len(got) == 200
    assert all(str(got[k]["amount"]) == f"{max(n for n in range(600) if n % 200 + 1 == k)}.00" for k in got)
    assert applied_seq(pg_url, stream_name) == last


def _delivered(client: redis.Redis, stream: str) -> int:
    group = client.xinfo_groups(stream)[0]
    return int(group.get("entries-read") or 0)
