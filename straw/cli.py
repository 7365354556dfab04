"""The `straw` command: run, check, preview, status, stream, replay, dead-letters."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from adapters.db.budget import check_budget
from bus.connect import bus_name
from bus.seam import Bus, Published
from outbox.lock import OutboxBusy, OutboxLock
from outbox.store import Outbox, OutboxError
from straw import logs
from straw.bus_reach import with_bus as _bus_or_none
from straw.config import Config, DatabaseSpec, DbSourceSpec
from straw.config_load import CONFIG_ENV, ConfigError, load_config
from straw.config_loaders import AnyLoaderSpec
from straw.config_types import parse_duration
from straw.outbox_check import check_outbox
from straw.redact import describe, redact
from straw.runner import Runner, build_pipeline
from straw.status_report import SourceFilter, SourceOrder, status_document

app = typer.Typer(
    help="straw: poll legacy systems, deliver canonical records to a Redis stream exactly once.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=CONFIG_ENV, help="The straw YAML file.", show_default=False),
]


def _load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print("[bold red]configuration error[/]", highlight=False)
        for problem in exc.problems:
            # soft_wrap: one problem is one line even in a log file or a narrow terminal (grep-able).
            err.print(f"  {redact(str(problem))}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _outbox(config: Config) -> Iterator[Outbox]:
    """The outbox for a read-only command; a full, read-only or damaged file is one line and exit 1."""
    if not config.sources:  # not made on a loader host by a command that only looks
        _fail("no sources in this file, so no outbox here: on a loader host `straw status` shows the loaders, "
              "`straw dlq list` their dead letters, `straw stream` their streams")
    try:
        outbox = Outbox(config.outbox.path)
    except OutboxError as exc:
        _fail(str(exc))
    try:
        yield outbox
    except OutboxError as exc:
        _fail(str(exc))
    finally:
        outbox.close()


def _fail(message: str) -> NoReturn:
    err.print("[red]error[/] ", end="", highlight=False)
    err.print(redact(message), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _seconds(value: str) -> float:
    """`--wait-lock 60s`: a duration as the configuration writes them."""
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else float(parse_duration(value))
    except Exception:
        raise typer.BadParameter(f"not a duration: {value!r}; write seconds (60) or e.g. '60s', '2m'") from None


@app.command()
def run(
    config_path: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Poll every source until caught up, publish, exit.")] = False,
    wait: Annotated[
        float, typer.Option(help="With --once: seconds to keep retrying an unreachable Redis before exiting.")
    ] = 30.0,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = None,
    wait_lock: Annotated[
        str, typer.Option(help="Seconds (or '60s', '2m') to wait for another straw process to release the outbox.")
    ] = "0",
) -> None:
    """Poll the sources and publish to Redis; runs until stopped (SIGTERM/Ctrl-C) unless --once.

    One process per outbox: a second one exits with code 1 at once, naming the holder's PID.
    """
    logs.setup(log_level)
    config = _load(config_path)
    if not config.sources:
        loaders = ", ".join(spec.name for spec in config.loaders)
        _fail(f"no sources in this file: `straw run` polls sources; its loaders run with `straw load NAME` ({loaders})")
    logs.setup(log_level, config.log.format)
    try:
        result = Runner(config, log_level).run(once=once, wait=wait, wait_lock=_seconds(wait_lock))
    except (OutboxBusy, OutboxError) as exc:
        _fail(str(exc))
    if once:
        for name, tally in result.tallies.items():
            out.print(f"{name}: {tally.summary()}", highlight=False)
        out.print(f"read {result.rows_read} rows; outbox backlog {result.backlog}", highlight=False)
    if result.stopped is not None:
        left = f"; {result.backlog} records wait in the outbox for the next run" if result.backlog else ""
        out.print(f"stopped by {result.stopped}{left}", highlight=False)
    for problem in result.errors:
        err.print("[red]error[/] ", end="", highlight=False)
        err.print(problem, markup=False, highlight=False, soft_wrap=True)
    if result.errors:
        raise typer.Exit(1)


@app.command()
def check(config_path: ConfigOption = None) -> None:
    """Validate the configuration and reach every source, the outbox, each loader's target and the bus; a line each."""
    logs.setup("WARNING")
    config = _load(config_path)
    failed = False

    def line(ok: bool, what: str, detail: str, *, warn: bool = False) -> None:
        nonlocal failed
        failed = failed or not (ok or warn)
        mark = "[green]ok[/]  " if ok else "[yellow]warn[/]" if warn else "[red]FAIL[/]"
        out.print(f"{mark} {what}: ", end="", highlight=False)
        out.print(redact(detail), markup=False, highlight=False, soft_wrap=True)

    counts = f"{len(config.sources)} sources, {len(config.loaders)} loaders, {len(config.entities)} entities"
    line(True, "config", counts)
    for spec in config.sources:
        try:  # every failure is one line, never a traceback (a missing DB driver fails in build_pipeline)
            pipeline = build_pipeline(config, spec)
        except Exception as exc:
            line(False, f"source {spec.name}", describe(exc))
            continue
        try:
            line(True, f"source {spec.name}", pipeline.source.check())
        except Exception as exc:
            line(False, f"source {spec.name}", describe(exc))
        finally:
            pipeline.source.close()
    for database in _databases(config):
        what = f"database {_database_name(database.url)}"
        try:
            detail, within = check_budget(database)
        except Exception as exc:
            line(False, what, describe(exc))
            continue
        line(within, what, detail, warn=not within)
    from loaders.target_check import check_target  # a drivers' import, for loader hosts only

    if config.sources:  # a loader host has no outbox
        ok, detail = check_outbox(config.outbox.path)  # writes nothing, creates nothing
        line(ok, "outbox", detail)
    for loader in config.loaders:
        ok, detail, warn = check_target(loader, config.entities)  # reaches it, writes nothing
        line(ok, f"loader {loader.name}", detail, warn=warn)
    # The streams' lengths too: an ACL user that may connect but not touch the streams fails here, not at run.
    info = _bus_or_none(config, lambda bus: (bus.describe(), [bus.length(s) for s in config.every_stream])[0])
    if isinstance(info, str):
        line(False, bus_name(config.bus_spec.url), info)
    else:
        line(info[0], bus_name(config.bus_spec.url), info[1])
    if failed:
        raise typer.Exit(1)


def _databases(config: Config) -> list[DatabaseSpec]:
    """The databases whose budget `check` reports: those behind a server (a SQLite file has no connection limit)."""
    urls = dict.fromkeys(
        s.url for s in config.sources if isinstance(s, DbSourceSpec) and not s.url.startswith("sqlite")
    )
    return [config.database(url) for url in urls]


def _database_name(url: str) -> str:
    """A database as `check` names it: never a password (an ODBC string may hold PWD=…, so only its kind)."""
    if url.startswith("odbc:"):
        return "odbc"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable url)"


@app.command()
def preview(
    source: Annotated[str, typer.Argument(help="Source name from the configuration.")],
    config_path: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="How many rows to read.")] = 10,
    screenshot: Annotated[
        Path | None,
        typer.Option(help="Scrape sources: write a PNG of the page read, each field's matches outlined and labelled."),
    ] = None,
) -> None:
    """Show the first canonical records of SOURCE; nothing is written anywhere (but the --screenshot PNG)."""
    logs.setup("WARNING")
    config = _load(config_path)
    try:
        spec = config.source(source)
    except KeyError:
        err.print(f"no source named {source!r}; sources: {', '.join(s.name for s in config.sources)}")
        raise typer.Exit(2) from None
    pipeline = build_pipeline(config, spec)
    if screenshot is not None and not hasattr(pipeline.source, "screenshot"):
        err.print(f"--screenshot: source {source!r} is not a scrape source; it has no page to show")
        raise typer.Exit(2)
    events: list[dict[str, Any]] = []
    dead: list[tuple[str, str]] = []
    try:
        for batch in pipeline.source.read(None, limit=limit):
            mapped = pipeline.mapper.map(batch)
            events.extend(orjson.loads(e) for _, e in mapped.events)
            dead.extend((d.position, d.reason) for d in mapped.dead)
    except Exception as exc:
        err.print(describe(exc), markup=False, highlight=False, soft_wrap=True)
        diagnose = getattr(pipeline.source, "diagnose", None)  # scrape: what each selector finds there
        probes = diagnose(exc, _previous_values(config, spec)) if diagnose is not None else None
        if probes:
            _print_probes(probes)
            _print_hints({p.field: p.hints for p in probes})
        if screenshot is not None:
            _screenshot(pipeline.source, screenshot, exc)
        raise typer.Exit(1) from None
    finally:
        pipeline.source.close()
    fields = list(config.entities[spec.entity].fields)
    table = Table(title=f"{spec.name} -> {spec.entity} (first {limit} rows)")
    table.add_column("subject", style="bold")
    for name in fields:
        table.add_column(name)
    for event in events:
        table.add_row(Text(event["subject"]), *(_cell(event["data"].get(f)) for f in fields))
    out.print(table)
    for position, reason in dead:
        out.print(f"[red]dead letter[/] at {position}: ", end="", highlight=False)
        out.print(reason, markup=False, highlight=False)
    selectors = getattr(pipeline.source, "selectors", None)  # scrape sources say which selector found what
    if selectors is not None:
        shown = selectors()
        _print_selectors(shown, len(events) + len(dead))
        hints = getattr(pipeline.source, "hints", None)
        if hints is not None and any(missing for *_, missing in shown):
            _print_hints(hints(_previous_values(config, spec)))
    if screenshot is not None:
        _screenshot(pipeline.source, screenshot, None)


def _screenshot(source: Any, path: Path, exc: BaseException | None) -> None:
    """Write the preview's page with its fields outlined; a failure to do so is one line and exit 1."""
    try:
        marked = source.screenshot(path, exc)
    except Exception as problem:
        err.print(describe(problem), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    found = ", ".join(f"{name} {count}" for name, count in marked.found.items()) or "none"
    out.print(f"screenshot: {path} (outlined: {found})", markup=False, highlight=False, soft_wrap=True)
    for line in marked.banner():
        out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)


def _print_selectors(selectors: Iterable[tuple[str, str, bool, int]], rows: int) -> None:
    """Which selector each field used, and in how many rows it matched: red ones need fixing."""
    table = Table(title="selectors (* required)")
    for column in ("field", "selector", "matched"):
        table.add_column(column)
    for name, where, required, missing in selectors:
        matched = Text(f"{rows - missing}/{rows}", style="bold red" if missing else "green")
        table.add_row(Text(name + (" *" if required else "")), Text(where), matched)
    out.print(table)


def _previous_values(config: Config, spec: Any) -> dict[str, list[str]]:
    """What each field of a scrape source published lately (its newest events in the stream), as text:
    the hints of a field that matched nothing look for elements resembling them. Bus down: none."""
    fields = {column: field for field, column in getattr(spec, "mapping", {}).items()}

    found = _bus_or_none(config, lambda bus: bus.newest(spec.stream, 200))
    values: dict[str, list[str]] = {}
    for entry in found if not isinstance(found, str) else []:
        try:
            event = orjson.loads(entry.event)
        except orjson.JSONDecodeError:
            continue
        if not str(event.get("source", "")).endswith(f"/{spec.name}") or not isinstance(event.get("data"), dict):
            continue
        for name in getattr(spec, "item_fields", lambda: [])():
            value = event["data"].get(fields.get(name, name))
            if value is not None and len(values.setdefault(name, [])) < 20:
                values[name].append(str(value))
    return values


def _print_hints(hints: dict[str, Any]) -> None:
    """For each field that matched nothing somewhere: the elements there that look most like it."""
    for name, found in hints.items():
        if not found:
            continue
        out.print(f"hint for {name}: nearest candidates", markup=False, highlight=False)
        for hint in found:
            out.print(redact(f"  {hint.selector}  {hint.text[:60]!r}  ({hint.why})"), markup=False,
                      highlight=False, soft_wrap=True)


def _print_probes(probes: Iterable[Any]) -> None:
    """After layout drift: every field, its selector, what it matched on that page and why it failed."""
    table = Table(title="selectors on the page that failed (* required)")
    for column in ("field", "selector", "matched", "first value", "problem"):
        table.add_column(column, overflow="fold")
    for p in probes:
        style = "bold red" if p.problem and p.required else "yellow" if p.problem else "green"
        table.add_row(
            Text(p.field + (" *" if p.required else "")), Text(p.selector),
            Text(f"{p.matched}/{p.of}", style=style), _cell(p.first), Text(redact(p.problem), style=style),
        )
    out.print(table, crop=False)


def _read_cell(spec: Any, rows: int) -> str:
    """A snapshot source lists every row at every poll: say so, so that "read" is not taken for changes
    (its changes are the events it published)."""
    return f"{rows} listed" if getattr(spec, "mode", None) == "snapshot" else str(rows)


def _cell(value: Any) -> Text:
    """Legacy text as it is: `[urgent]` is data, not console markup."""
    return Text("∅" if value is None else str(value))


@app.command()
def status(
    config_path: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document instead of tables.")] = False,
    state_filter: Annotated[
        SourceFilter | None, typer.Option("--state", help="Only sources in this state.", case_sensitive=False)
    ] = None,
    sort: Annotated[
        SourceOrder, typer.Option(help="state: errors first, then never polled, then ok; each by name.")
    ] = SourceOrder.STATE,
) -> None:
    """Per source: position, last poll, rows read and published, errors; outbox backlog; streams; per loader
    and stream: applied and newest seq, lag, dead letters."""
    config = _load(config_path)
    # In a log or a pipe nothing is cut: the error column is what an operator greps for.
    shown = out if out.is_terminal else Console(file=out.file, width=100_000)
    document: dict[str, Any] = {}
    if config.sources:
        with _outbox(config) as outbox:
            document = status_document(config, outbox, only=state_filter, order=sort)
    if config.loaders:
        from loaders.status import loader_status

        document["loaders"] = loader_status(config)
    if as_json:
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if config.sources:
        _print_sources(config, document, state_filter, shown)
    if config.loaders:
        table = Table(title="loaders")
        for column in ("loader", "stream", "applied seq", "newest seq", "lag", "dead letters", "error"):
            table.add_column(column)
        for row in document["loaders"]:
            table.add_row(row["loader"], row["stream"], *("?" if row[k] is None else str(row[k]) for k in (
                "applied_seq", "newest_seq", "lag", "dead_letters")), Text(row["error"] or "", style="red"))
        shown.print(table)


def _print_sources(config: Config, document: dict[str, Any], state_filter: SourceFilter | None,
                   shown: Console) -> None:
    specs = {s.name: s for s in config.sources}
    sources, stream_rows, counts = document["sources"], document["streams"], document["counts"]
    names, listed, backlog = list(specs), sources, document["outbox"]["backlog"]
    table = Table(
        title=f"sources ({len(names)}: {counts['error']} error, {counts['new']} new, "
        f"{counts['ok']} ok" + (f"; showing {len(listed)} {state_filter.value}" if state_filter else "")
        + ")"
    )
    for column in ("source", "position", "last poll", "read", "published", "dead letters", "error"):
        table.add_column(column)
    if config.lease:
        table.add_column("lease holder")
    for row in sources:
        spec = specs[row["source"]]
        table.add_row(
            row["source"], Text(row["position"] or "(start)"), row["last_poll"], _read_cell(spec, row["read"]),
            str(row["published"]), str(row["dead_letters"]), Text(row["error"] or "", style="red"),
            *([row["lease_holder"] or "(none)"] if config.lease else []),
        )
    shown.print(table)
    table = Table(title="streams")
    for column in ("stream", "length", "checkpoint", "published seq", "backlog", "last publish", "error",
                   "retained", "rollback"):
        table.add_column(column)
    for row in stream_rows:
        table.add_row(
            row["stream"], "?" if row["length"] is None else str(row["length"]), row["checkpoint"],
            str(row["published_seq"]), str(row["backlog"]), row["last_publish"], Text(row["error"] or "", style="red"),
            _retained_cell(row["retained"]), Text(row["rollback"] or "", style="red"),
        )
    shown.print(table)
    size = document["outbox"]["bytes"]
    out.print(f"outbox {config.outbox.path}: {backlog} records waiting, {size / 1e6:.1f} MB", highlight=False)


def _retained_cell(retained: dict[str, Any] | None) -> str:
    if not retained or not retained["records"]:
        return "0"
    return f"{retained['records']} (seq {retained['first_seq']}..{retained['last_seq']})"


@app.command()
def stream(
    config_path: ConfigOption = None,
    name: Annotated[str | None, typer.Option("--stream", help="Stream name; default: every stream.")] = None,
    count: Annotated[int, typer.Option(help="How many of the newest entries to show.")] = 5,
) -> None:
    """Show the newest entries of the configured streams and their lengths."""
    config = _load(config_path)
    names = [name] if name else config.every_stream

    def read(bus: Bus) -> dict[str, tuple[int, list[Published]]]:
        return {s: (bus.length(s), bus.newest(s, count)) for s in names}

    found = _bus_or_none(config, read)
    if isinstance(found, str):
        err.print(f"{bus_name(config.bus_spec.url)} {found}", markup=False, highlight=False)
        raise typer.Exit(1)
    for stream_name, (length, entries) in found.items():
        table = Table(title=f"{stream_name}: {length} entries (newest {len(entries)})")
        for column in ("entry id", "seq", "type", "subject", "data"):
            table.add_column(column, overflow="fold")
        for entry in entries:
            event = orjson.loads(entry.event)
            data = orjson.dumps(event["data"]).decode()
            table.add_row(entry.entry_id, str(entry.seq), event["type"], Text(event["subject"]), Text(data))
        out.print(table)


@app.command()
def reread(
    stream_name: Annotated[str, typer.Argument(metavar="STREAM", help="The stream the bus lost records of.")],
    config_path: ConfigOption = None,
) -> None:
    """After a bus rollback beyond the outbox's retention: read the lost records again from the sources.

    Run it with straw stopped. The stream's records above the bus checkpoint are dropped from the
    outbox; incremental sources go back to their positions on the checkpoint, snapshot sources list
    everything again. The next `straw run` re-publishes them (with new seqs: the lost ones stay a gap).
    """
    config = _load(config_path)
    if stream_name not in config.streams:
        _fail(f"no source publishes to stream {stream_name!r}; the configured streams: {', '.join(config.streams)}")
    ckpt = _bus_or_none(config, lambda bus: bus.checkpoint(stream_name))
    if isinstance(ckpt, str):
        _fail(f"bus {ckpt}: the reread starts from the stream's checkpoint on the bus; try again once it is up")
    try:
        with OutboxLock(config.outbox.path), _outbox(config) as outbox:
            published = outbox.published_seq(stream_name)
            if ckpt.outbox not in (None, outbox.identity):
                _fail(f"stream {stream_name!r}: its checkpoint was written by another outbox ({ckpt.outbox}); "
                      "reread from the straw instance that publishes it")
            if ckpt.seq >= published:
                out.print(f"stream {stream_name}: nothing to read again: the bus holds seq {ckpt.seq}, this outbox "
                          f"published up to seq {published}", highlight=False)
                return
            sources = [s.name for s in config.sources if s.stream == stream_name]
            dropped, listed = outbox.replay(stream_name, ckpt.seq, {n: ckpt.positions.get(n) for n in sources})
    except OutboxBusy as exc:
        _fail(f"{exc} (stop straw before a reread)")
    out.print(f"stream {stream_name}: dropped {dropped} records above seq {ckpt.seq} (the bus checkpoint); "
              "the next `straw run` reads them again:", highlight=False)
    for name in sources:
        again = "a full listing" if name in listed else f"from position {ckpt.positions.get(name) or '(start)'}"
        out.print(f"  {name}: {again}", markup=False, highlight=False)


@app.command("dead-letters")
def dead_letters(
    config_path: ConfigOption = None,
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
) -> None:
    """List rows that could not be mapped, with the reason and the raw row."""
    config = _load(config_path)
    with _outbox(config) as outbox:
        rows = outbox.dead_letters(source, limit)
    table = Table(title="dead letters (newest first)")
    for column in ("id", "source", "position", "reason", "raw row"):
        table.add_column(column, overflow="fold")
    for row in rows:
        # Text, not markup: legacy values such as "[/b]" must print as written, not crash the table.
        table.add_row(str(row["id"]), row["source"], *(Text(row[k]) for k in ("position", "reason", "raw")))
    out.print(table)


@app.command()
def discover(
    url: Annotated[str, typer.Argument(help="SQLAlchemy URL or odbc:…; quote it to keep ${VAR} out of the draft.")],
    write: Annotated[Path | None, typer.Option("--write", "-w", help="Write the draft here (never over a file).")]
    = None,
    tables: Annotated[str | None, typer.Option(help="Only these tables or views, comma-separated.")] = None,
    schema: Annotated[str | None, typer.Option(help="The schema to read (default: the connection's).")] = None,
    stream_prefix: Annotated[str, typer.Option(help="Put before each stream name, e.g. 'erp.'.")] = "",
) -> None:
    """List the tables of a legacy database and draft a configuration for them (read-only)."""
    from straw.discover import discover as run_discover
    from straw.discover import write_draft
    from straw.draft import render, summary

    logs.setup("WARNING")
    wanted = [t.strip() for t in (tables or "").split(",") if t.strip()]
    try:
        found = run_discover(url, schema, wanted)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(redact(str(problem)), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # unreachable, refused, no such schema: one line, no traceback
        _fail(f"cannot read the database: {describe(exc)}")
    table = Table(title="discovered (rows: ~ an estimate the database keeps)")
    for column in ("relation", "rows", "primary key", "unique indexes", "proposed mode"):
        table.add_column(column)
    for row in summary(found.found):
        table.add_row(*(Text(cell) for cell in row))
    err.print(table)
    text = render(found, stream_prefix)
    if write is None:
        sys.stdout.write(text)
        return
    try:
        write_draft(write, text)
    except FileExistsError:
        _fail(f"{write} exists; the draft is never written over a file: pick another name or remove it")
    except OSError as exc:
        _fail(f"cannot write {write}: {exc.strerror or exc}")
    err.print(f"wrote {write}; next: straw check -c {write}", highlight=False, markup=False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the configuration file, for editors (yaml-language-server) and CI."""
    from straw.schema import config_schema

    sys.stdout.write(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")


def _loader_spec(config: Config, name: str) -> AnyLoaderSpec:
    try:
        return config.loader(name)
    except KeyError:
        known = ", ".join(loader.name for loader in config.loaders) or "none configured under `loaders:`"
        err.print(f"no loader named {name!r}; loaders: {known}", markup=False, highlight=False)
        raise typer.Exit(2) from None


@app.command()
def load(
    name: Annotated[str, typer.Argument(help="Loader name from the configuration's `loaders:`.")],
    config_path: ConfigOption = None,
    once: Annotated[bool, typer.Option("--once", help="Apply what is in the streams now, then exit.")] = False,
    consumer: Annotated[
        str | None,
        typer.Option(help="This member's name in the group; default: <host>-<pid> (a jsonl loader: <host>-<loader>)."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR.")] = None,
) -> None:
    """Apply the loader's streams to its target until SIGTERM/Ctrl-C (the batch in hand is finished and acked)."""
    from bus.names import bus_kind
    from loaders.jsonl import DirectoryBusy, UnreadableFile
    from loaders.metrics import MetricsPortUnavailable
    from loaders.repair import StreamBehind
    from loaders.sdk import TargetDown
    from loaders.service import open_consumer, run_loader, stop_on_signals
    from loaders.sql_schema import SchemaError

    logs.setup(log_level)
    config = _load(config_path)
    spec = _loader_spec(config, name)
    with _loader_bus_errors(bus_kind(config.bus_spec.url), "; nothing was lost: run again when it is back"):
        try:
            with stop_on_signals() as stop:
                member = open_consumer(config, spec, consumer)
                tally = run_loader(config, spec, once=once, stop=stop, consumer=member)
        except SchemaError as exc:
            err.print(f"[red]error[/] {redact(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (DirectoryBusy, UnreadableFile, PermissionError, FileExistsError, NotADirectoryError) as exc:  # JSONL
            _fail(f"loader {name}: {exc}")
        except (StreamBehind, MetricsPortUnavailable) as exc:
            _fail(f"loader {name}: {exc}")
        except TargetDown as exc:
            _fail(f"loader {name}: target unreachable ({exc}); the records wait in the stream")

    waiting = "".join(f"; {stream}: bus behind (applied seq {done}, bus newest {newest}), waiting for its repair"
                      for stream, (done, newest) in tally.behind.items())
    out.print(f"{name}: {tally.applied} applied, {tally.dead_letters} dead letters, {len(tally.pending)} waiting "
              f"for a retry" + waiting + (" (stopped by signal)" if tally.stopped else ""), highlight=False)


dlq_app = typer.Typer(help="Dead letters of both ends: rows that could not be mapped (outbox) and records a "
                        "loader could not apply (dead-letter streams).", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
ItemArgument = Annotated[str, typer.Argument(help="outbox:<id> or <dead-letter stream>:<entry id>, as listed.")]


@contextmanager
def _dlq_sources(config: Config) -> Iterator[tuple[Outbox | None, Any]]:
    """The outbox if this host has one, and the bus's dead-letter streams if loaders are configured."""
    from bus.names import bus_kind
    from loaders.dead_letters import CannotOnThisBus
    from loaders.service import open_dead_letter_store

    outbox = None
    if config.outbox.path.exists():
        try:
            outbox = Outbox(config.outbox.path)
        except OutboxError as exc:
            _fail(str(exc))
    store = open_dead_letter_store(config) if config.loaders else None
    try:
        with _loader_bus_errors(bus_kind(config.bus_spec.url)):
            try:
                yield outbox, store
            except (OutboxError, CannotOnThisBus) as exc:
                _fail(str(exc))
    finally:
        if outbox is not None:
            outbox.close()
        if store is not None:
            store.close()


@contextmanager
def _loader_bus_errors(kind: str, down_hint: str = "") -> Iterator[None]:
    """A loader command's bus failure as one line: refused (credentials, ACL: no use retrying) or unreachable."""
    from bus.redis import REDIS_DOWN, REDIS_REFUSED
    from loaders.consumer import BusDown, BusRefused
    from loaders.service import refused_line

    try:
        yield
    except REDIS_REFUSED as exc:  # before REDIS_DOWN: redis-py's AuthenticationError is a ConnectionError
        _fail(refused_line(exc))
    except REDIS_DOWN as exc:
        _fail(f"redis unreachable ({describe(exc)})")
    except BusRefused as exc:
        _fail(redact(str(exc)))
    except BusDown as exc:
        _fail(f"{kind} unreachable ({redact(str(exc))}){down_hint}")


def _dlq_item(config: Config, item: str, outbox: Outbox | None, client: Any) -> Any:
    from straw.dead_letter_items import NoSuchItem, find

    try:
        return find(item, outbox, client, config)
    except NoSuchItem as exc:
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@dlq_app.command("list")
def dlq_list(
    config_path: ConfigOption = None,
    limit: Annotated[int, typer.Option(help="How many of each kind, newest first.")] = 20,
) -> None:
    """Every dead letter: kind, where, when, reason."""
    from straw.dead_letter_items import outbox_items, stream_items

    config = _load(config_path)
    with _dlq_sources(config) as (outbox, client):
        items = (outbox_items(outbox, limit) if outbox else []) + (
            stream_items(client, config, limit) if client else [])
    table = Table(title=f"dead letters ({len(items)})")
    for column in ("item", "kind", "where", "when", "reason"):
        table.add_column(column, overflow="fold")
    for item in items:
        table.add_row(Text(item.item), item.kind, Text(item.where), item.when, Text(redact(item.reason)))
    out.print(table)


@dlq_app.command("show")
def dlq_show(item: ItemArgument, config_path: ConfigOption = None) -> None:
    """The reason and the raw row or record of one dead letter."""
    config = _load(config_path)
    with _dlq_sources(config) as (outbox, client):
        found = _dlq_item(config, item, outbox, client)
    out.print(f"{found.item} ({found.kind} dead letter, {found.where}, {found.when})", markup=False, highlight=False)
    out.print(f"reason: {redact(found.reason)}", markup=False, highlight=False, soft_wrap=True)
    for key, value in found.details.items():
        if key not in ("event", "error"):
            out.print(f"{key}: {value}", markup=False, highlight=False, soft_wrap=True)
    out.print(("raw row: " if found.kind == "mapping" else "record: ") + found.raw, markup=False, highlight=False,
              soft_wrap=True)


@dlq_app.command("retry")
def dlq_retry(item: ItemArgument, config_path: ConfigOption = None) -> None:
    """Send one dead letter through again: a row is re-mapped with today's configuration, a record goes back
    to its stream for its loader's group."""
    from loaders.service import apply_dead_letter
    from straw.dead_letter_items import NoSuchItem, retry_loader, retry_mapping

    config = _load(config_path)
    with _dlq_sources(config) as (outbox, client):
        found = _dlq_item(config, item, outbox, client)
        try:
            if found.kind == "mapping":
                assert outbox is not None
                said = retry_mapping(config, outbox, found)
            else:
                assert client is not None
                said = retry_loader(client, found, lambda fields: apply_dead_letter(config, fields))
        except NoSuchItem as exc:
            _fail(str(exc))
    out.print(f"{item}: {said}", markup=False, highlight=False, soft_wrap=True)
    if said.startswith("still"):
        raise typer.Exit(1)


@dlq_app.command("drop")
def dlq_drop(
    item: ItemArgument,
    config_path: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete one dead letter for good (asks first)."""
    from straw.dead_letter_items import drop

    config = _load(config_path)
    with _dlq_sources(config) as (outbox, client):
        found = _dlq_item(config, item, outbox, client)
        if not yes and not typer.confirm(f"delete {found.item} ({found.reason[:80]})?", default=False):
            raise typer.Exit(1)
        drop(found, outbox, client)
    out.print(f"{item}: dropped", markup=False, highlight=False)


@app.command()
def replay(
    name: Annotated[str, typer.Argument(help="Loader name.")],
    config_path: ConfigOption = None,
    from_seq: Annotated[int | None, typer.Option("--from-seq", help="Re-apply records from this seq on.")] = None,
    from_time: Annotated[
        str | None, typer.Option("--from-time", help="Re-apply records added at or after this ISO time (UTC if naive).")
    ] = None,
) -> None:
    """Move the loader's group back and apply its streams again from a point (a target restored from a
    backup); records the target has already are skipped, so nothing is applied twice."""
    from bus.names import JetStreamOptions, bus_kind
    from loaders.replay import ReplayError, rewind, rewind_nats, rewind_rabbitmq
    from loaders.service import redis_client, run_loader

    logs.setup("WARNING")
    config = _load(config_path)
    spec = _loader_spec(config, name)
    if (from_seq is None) == (from_time is None):
        err.print("give exactly one of --from-seq N or --from-time 2026-11-29T10:00:00")
        raise typer.Exit(2)
    bus = config.bus_spec
    kind = bus_kind(bus.url)
    if kind != "redis" and from_seq is None:
        err.print(f"--from-time needs a Redis bus (its entry ids are times); on {kind} give --from-seq N "
                  "(`straw stream` shows each record's seq and time)")
        raise typer.Exit(2)
    client = redis_client(bus.url, 10.0) if kind == "redis" else None
    try:
        with _loader_bus_errors(kind):
            for stream in spec.streams:
                if client is not None:
                    said = rewind(client, stream, spec.group_name, from_seq=from_seq, from_time=from_time)
                elif kind == "nats":
                    assert from_seq is not None
                    said = rewind_nats(bus.url, bus.jetstream_options() or JetStreamOptions(), spec, stream, from_seq)
                else:
                    assert from_seq is not None
                    said = rewind_rabbitmq(bus.url, spec, stream, from_seq)
                out.print(f"{stream}: {said}", markup=False, highlight=False)
    except ReplayError as exc:
        _fail(str(exc))
    finally:
        if client is not None:
            client.close()
    import threading

    tally = run_loader(config, spec, once=True, stop=threading.Event())
    out.print(f"{name}: {tally.applied} records replayed ({tally.dead_letters} dead letters)", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
