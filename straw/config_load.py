"""Read a straw YAML file into a validated `Config`, or fail with readable lines.

Every problem names the file, the line and the key, and says how to fix it;
values taken from `${ENV_VAR}` or `${file:/path}` are registered as secrets so
that logs and errors can redact them.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import yaml
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from straw.config import AnySourceSpec, Config
from straw.config_loaders import AnyLoaderSpec, JsonlLoaderSpec
from straw.config_scrape import ScrapeSourceSpec
from straw.redact import redact, register_secret

CONFIG_ENV = "STRAW_CONFIG"
_VAR = re.compile(r"\$\{([^}]*)\}")

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"
        # One line, whatever a key or value holds: control characters shown escaped.
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def resolve_path(path: str | Path | None) -> Path:
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        raise ConfigError(
            [Problem("(none)", None, "", f"no configuration given: pass --config PATH or set {CONFIG_ENV}")]
        )
    return Path(chosen)


def load_config(path: str | Path | None = None) -> Config:
    file = resolve_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [Problem(str(file), None, "", f"configuration file not found ({file.absolute()}); "
                     f"pass --config PATH or set {CONFIG_ENV}")]
        ) from None
    except OSError as exc:
        raise ConfigError([Problem(str(file), None, "", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(file), None, "", f"not UTF-8 text ({exc.reason}); save it as UTF-8")]) from None
    return parse_config(text, file)


def parse_config(text: str, file: Path) -> Config:
    name = str(file)
    try:
        loader = _UniqueKeyLoader(text)
    except yaml.reader.ReaderError as exc:  # checked before parsing starts: a control character
        raise ConfigError([_unprintable(name, text, exc)]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _DuplicateKey as dup:
        raise ConfigError(
            [Problem(name, dup.line, dup.key, f"duplicate key (first at line {dup.first}); YAML would silently keep "
                     "only the last one: remove or rename one")]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = f" (column {mark.column + 1})" if mark else ""
        raise ConfigError(
            [Problem(name, line, "", f"not valid YAML{column}: {exc.problem or exc}; check the indentation "
                     "(spaces, not tabs; keys of one mapping start in the same column) and quoting")]
        ) from None
    except yaml.reader.ReaderError as exc:
        raise ConfigError([_unprintable(name, text, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, None, "", "not valid YAML: " + " ".join(str(exc).split()))]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError([Problem(name, 1, "", "expected a mapping with `entities:` and `sources:` (or `loaders:`) "
                                           "at the top")])
    lines = _line_map(node)
    _warn_if_exposed(file, name, data, lines)
    base = file.resolve().parent
    problems: list[Problem] = []
    data = _substitute(data, (), base, lines, name, problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem(err, name, lines, data) for err in exc.errors()]) from None
    return _anchor_paths(config, base, name, lines)


def expand_value(value: str, key: str, base: Path | None = None) -> str:
    """One value given outside a file (a command-line URL), its `${VAR}` substituted and secrets registered
    for masking exactly as in a configuration file."""
    problems: list[Problem] = []
    expanded = _substitute(value, (key,), base or Path.cwd(), {}, "command line", problems)
    if problems:
        raise ConfigError(problems)
    return str(expanded)


def _unprintable(name: str, text: str, exc: yaml.reader.ReaderError) -> Problem:
    line = text.count("\n", 0, exc.position) + 1
    character = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    return Problem(name, line, "", f"not valid YAML: character U+{character:04X} is not allowed here (a control "
                   "character); remove it, or save the file as plain UTF-8 text")


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config with an entity's `key:` twice is a mistake to name."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key_node, _value in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges are meant to be overridden
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise _DuplicateKey(str(key_node.value), line, seen[key_node.value])
            seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def _line_map(node: yaml.Node | None) -> dict[Path_, int]:
    lines: dict[Path_, int] = {}

    def walk(n: yaml.Node, path: Path_) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                child = (*path, str(key_node.value))
                lines[child] = key_node.start_mark.line + 1
                walk(value_node, child)
        elif isinstance(n, yaml.SequenceNode):
            for index, item in enumerate(n.value):
                child = (*path, index)
                lines[child] = item.start_mark.line + 1
                walk(item, child)

    if node is not None:
        lines[()] = node.start_mark.line + 1
        walk(node, ())
    return lines


def _substitute(
    value: Any, path: Path_, base: Path, lines: dict[Path_, int], file: str, problems: list[Problem]
) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, (*path, str(k)), base, lines, file, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, (*path, i), base, lines, file, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def expand(match: re.Match[str]) -> tuple[str, bool]:
        """The value of one `${…}`, and whether where it came from makes it a secret."""
        expr = match.group(1)
        if expr == "CONFIG_DIR":
            return str(base), False
        if expr.startswith("file:"):
            target = Path(expr[5:]).expanduser()
            target = target if target.is_absolute() else base / target
            try:
                return target.read_text(encoding="utf-8").rstrip("\r\n"), True
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                problems.append(
                    Problem(file, lines.get(path), _dotted(path),
                            f"cannot read secret file {target}: {reason}; create it or fix the path")
                )
                return "", False
        # `${secret:VAR}`: a variable marked secret where neither its name nor the key says so.
        marked = expr.startswith("secret:")
        var, has_default, default = expr.removeprefix("secret:").partition(":-")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
            problems.append(
                Problem(file, lines.get(path), _dotted(path),
                        f"bad substitution ${{{expr}}}: use ${{VAR}}, ${{VAR:-default}}, ${{secret:VAR}} or "
                        "${file:/path}")
            )
            return "", False
        found = os.environ.get(var)
        if found is None or (found == "" and has_default):
            if has_default:
                return default, marked
            problems.append(
                Problem(file, lines.get(path), _dotted(path),
                        f"environment variable {var} is not set; export it or write ${{{var}:-default}}")
            )
            return "", False
        return found, marked or _SECRET_NAME.search(var) is not None

    userinfo = _userinfo_span(value)
    secret_key = _is_secret_key(path)

    def substitute(match: re.Match[str]) -> str:
        found, secret = expand(match)
        # Masked: what the file, the variable's name, the key, or the place in the value says is a secret;
        # hosts, ports, database and user names, modes stay readable in errors.
        secret = secret or secret_key or _SECRET_ASSIGNMENT.search(value[: match.start()]) is not None
        if userinfo and userinfo[0] <= match.start() < userinfo[1]:
            # Inside `user:password@` a '@', '/', ':' or '#' must be percent-encoded, or the URL parses
            # wrongly and part of the password can surface in an error message as a host name.
            quoted = quote(found, safe="")
            if secret or ":" in _opaque(value)[userinfo[0]: match.start()]:  # the password, not the user name
                register_secret(found)
                register_secret(quoted)
            return quoted
        if secret:
            register_secret(found)
        return found

    return _VAR.sub(substitute, value)


# Names that say "this is a secret": of an environment variable, of a configuration key, or of a
# `name=` inside a value (an ODBC `PWD=`, a `?token=` in a URL).
_SECRET_WORDS = r"pass|pwd|secret|token|credential|api[-_]?key|private[-_]?key|auth|cookie|session[-_]?id"
_SECRET_NAME = re.compile(_SECRET_WORDS, re.I)
_SECRET_ASSIGNMENT = re.compile(rf"(?:{_SECRET_WORDS})[\w.-]*\s*=\s*$", re.I)


_ODBC_PASSWORD = re.compile(r"(?:^|[;:])\s*(?:pwd|password)\s*=\s*([^;]+)", re.I)


def _is_secret_key(path: Path_) -> bool:
    """A value under a key such as `password`, `basic_auth.password`, a login field `j_password`, a
    header `Authorization`: the last named key decides (`basic_auth.username` is not a secret)."""
    names = [p for p in path if isinstance(p, str)]
    return bool(names) and _SECRET_NAME.search(names[-1]) is not None


def _inline_secrets(value: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Where the file holds a secret as written text rather than a `${…}`: a value under a secret key, the
    password of a URL, an ODBC PWD=."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _inline_secrets(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _inline_secrets(item, (*path, index))
    elif isinstance(value, str) and value.strip():
        span = _userinfo_span(value)
        password = value[span[0]:span[1]].partition(":")[2] if span else ""
        odbc = _ODBC_PASSWORD.findall(value)
        if (_is_secret_key(path) and "${" not in value) or (password and "${" not in password) or \
                any("${" not in written for written in odbc):
            yield path


def _warn_if_exposed(file: Path, name: str, data: Any, lines: dict[Path_, int]) -> None:
    """A configuration every user of the host may read must not hold a secret itself: say where (never what)."""
    if os.name == "nt":  # Windows: NTFS ACLs, not mode bits, decide who reads it
        return
    try:
        readable = file.stat().st_mode & stat.S_IROTH
    except OSError:
        return
    if not readable:
        return
    for path in _inline_secrets(data):
        problem = Problem(
            name, lines.get(path), _dotted(path),
            "a secret written inline in a file every user of this host can read; chmod 600 the file "
            "(owned by straw's user), or write the secret as ${ENV_VAR} or ${file:/run/secrets/…}",
        )
        # Like a configuration error, a plain line on stderr: never into a command's stdout (`status --json`),
        # whether or not the command set up logging.
        print(f"warning: {problem}", file=sys.stderr, flush=True)


def _opaque(template: str) -> str:
    """The template with each `${…}` as a run of x's of its length: its ':' and '/' are not the URL's."""
    return _VAR.sub(lambda m: "x" * len(m.group(0)), template)


def _userinfo_span(template: str) -> tuple[int, int] | None:
    """Where `user:password` sits in a URL template, each `${…}` counted as opaque."""
    found = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*)@", _opaque(template))
    return found.span(1) if found else None


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _problem(err: Any, file: str, lines: dict[Path_, int], data: Any) -> Problem:
    loc: Path_ = tuple(err["loc"])
    # A model-level check reports against the whole model; `at` (see config.py) names the key inside it.
    loc = (*loc, *(err.get("ctx") or {}).get("at", ()))
    if err["type"] == "union_tag_invalid":
        loc = (*loc, "kind")
    # Pydantic adds the union tag ("db") to the location; keep only what exists in the file.
    path: Path_ = ()
    node = data
    for part in loc:
        in_file = (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        )
        if in_file:
            node, path = node[part], (*path, part)
        elif err["type"] in ("missing", "extra_forbidden") and part == loc[-1]:
            path = (*path, part)
    line = lines.get(path)
    parent = path[:-1]
    while line is None and parent:
        line, parent = lines.get(parent), parent[:-1]
    if line is None:  # a key missing at the top: the document's first line
        line = lines.get(())
    # redact: a value pydantic echoes back may have come from ${ENV_VAR} or ${file:…}.
    return Problem(file, line, _dotted(path), redact(_message(err, path)))


def _message(err: Any, path: Path_) -> str:
    kind = err["type"]
    key = str(path[-1]) if path else ""
    if kind == "missing":
        return f"missing required key `{key}`; add it (see README, Configuration reference)"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path[:-1])
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed here: {', '.join(sorted(allowed))}"
        return f"unknown key `{key}`; {hint}"
    message = str(err["msg"]).removeprefix("Value error, ")
    if kind in ("enum", "literal_error"):
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        close = difflib.get_close_matches(str(err.get("input")), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{message} (got {err.get('input')!r}){hint}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        return f"unknown kind '{ctx.get('tag')}'; use one of: {ctx.get('expected_tags')}"
    return message


def _allowed_keys(path: Path_) -> list[str]:
    # Several models may fit one place (the kinds of source); a dict field's next part is its own key.
    models: list[type[BaseModel]] = [Config]
    dict_key_next = False
    for part in path:
        if isinstance(part, int):
            continue
        if dict_key_next:
            dict_key_next = False
            continue
        fields = [f for m in models for name, f in m.model_fields.items() if part in (name, f.alias)]
        models = [m for f in fields for m in _models_of(f.annotation)]
        dict_key_next = any(_is_dict(f.annotation) for f in fields)
    return list(dict.fromkeys(f.alias or name for m in models for name, f in m.model_fields.items()))


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()) or getattr(annotation, "__metadata__", ()):
        found.extend(_models_of(arg))
    origin = getattr(annotation, "__origin__", None)
    return found or (_models_of(origin) if origin not in (None, annotation) else [])


def _is_dict(annotation: Any) -> bool:
    if getattr(annotation, "__origin__", None) is dict:
        return True
    return any(_is_dict(a) for a in getattr(annotation, "__args__", ()) if getattr(a, "__origin__", None))


def _anchor_paths(config: Config, base: Path, file: str, lines: dict[Path_, int]) -> Config:
    """Relative paths in the file are relative to the file's folder, not to the shell's."""
    # resolve(): the paths straw shows and opens read cleanly, without `..`.
    outbox_path = (base / config.outbox.path.expanduser()).resolve()
    redis_password = urlsplit(config.bus_spec.url).password
    if redis_password is None and config.bus_spec.is_nats:
        redis_password = urlsplit(config.bus_spec.url).username  # nats://TOKEN@host: the user part is the token
    if redis_password:  # written inline or substituted: either way it is the password
        register_secret(redis_password)
        register_secret(unquote(redis_password))
    sources: list[AnySourceSpec] = []
    problems: list[Problem] = []
    for index, source in enumerate(config.sources):
        if isinstance(source, ScrapeSourceSpec):
            sources.append(_anchor_scrape(source, base))
            continue
        if source.url.startswith("odbc:"):  # an ODBC connection string or DSN, not a URL (adapters/db/odbc.py)
            for written in _ODBC_PASSWORD.findall(source.url):
                register_secret(written)
            sources.append(source)
            continue
        try:
            url = make_url(source.url)
        except ArgumentError:
            problems.append(
                Problem(file, lines.get(("sources", index, "url")), f"sources[{index}].url",
                        "not a SQLAlchemy URL; write dialect+driver://user@host/db, e.g. "
                        "postgresql+psycopg://straw@db/erp or sqlite:///legacy.db")
            )
            continue
        if url.password:
            register_secret(str(url.password))
        unusable = _driver_problem(url)
        if unusable:
            problems.append(Problem(file, lines.get(("sources", index, "url")), f"sources[{index}].url", unusable))
            continue
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            database = Path(url.database).expanduser()
            if not url.database.startswith("file:"):  # a `file:` URI (uri=true) is passed on as written
                source = source.model_copy(
                    update={"url": url.set(database=str((base / database).resolve())).render_as_string(
                        hide_password=False)}
                )
        sources.append(source)
    loaders = [_anchor_loader(spec, index, base, file, lines, problems) for index, spec in enumerate(config.loaders)]
    if problems:
        raise ConfigError(problems)
    return config.model_copy(
        update={"outbox": config.outbox.model_copy(update={"path": outbox_path}), "sources": sources,
                "loaders": loaders}
    )


def _anchor_loader(
    loader: AnyLoaderSpec, index: int, base: Path, file: str, lines: dict[Path_, int], problems: list[Problem]
) -> AnyLoaderSpec:
    """A loader's target: its password is a secret, its driver must be there, its files are beside this file."""
    if isinstance(loader, JsonlLoaderSpec):
        return loader.model_copy(update={"directory": (base / loader.directory.expanduser()).resolve()})
    where = lines.get(("loaders", index, "url"))
    try:
        url = make_url(loader.url)
    except ArgumentError:
        problems.append(Problem(file, where, f"loaders[{index}].url", "not a SQLAlchemy URL; write e.g. "
                                "postgresql+psycopg://loader@dwh/erp or sqlite:///target.db"))
        return loader
    if url.password:
        register_secret(str(url.password))
    unusable = _driver_problem(url)
    if unusable:
        problems.append(Problem(file, where, f"loaders[{index}].url", unusable))
    elif url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not url.database.startswith("file:"):
        database = (base / Path(url.database).expanduser()).resolve()
        return loader.model_copy(update={"url": url.set(database=str(database)).render_as_string(hide_password=False)})
    return loader


_MULTI_STATEMENTS = 1 << 16  # MySQL's CLIENT_MULTI_STATEMENTS


def _driver_problem(url: URL) -> str | None:
    """Why SQLAlchemy cannot open this kind of URL (unknown dialect, driver not installed), or None."""
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        if url.drivername.startswith("postgres"):
            return f"unknown database kind '{url.drivername}'; did you mean 'postgresql+psycopg'?"
        return (f"unknown database kind '{url.drivername}'; write e.g. postgresql+psycopg://, mysql+pymysql://, "
                "sqlite:///, mssql+pyodbc:// or odbc:<connection string>, or install the driver package that "
                "provides this dialect")
    except ImportError as exc:
        return (f"the driver for '{url.drivername}' is not installed (no module {exc.name or exc}); install it "
                "(pip install …) or pick another driver")
    flag = str(url.query.get("client_flag", "0"))
    if url.get_backend_name() in ("mysql", "mariadb") and flag.isdigit() and int(flag) & _MULTI_STATEMENTS:
        return "`client_flag` allows several statements in one string (MULTI_STATEMENTS); remove that flag"
    return None


def _anchor_scrape(source: ScrapeSourceSpec, base: Path) -> ScrapeSourceSpec:
    update: dict[str, Any] = {"debug_dir": (base / source.debug_dir.expanduser()).resolve()}
    if source.login is not None and source.login.session_file is not None:
        session = (base / source.login.session_file.expanduser()).resolve()
        update["login"] = source.login.model_copy(update={"session_file": session})
    if isinstance(source.http.verify, Path):
        update["http"] = source.http.model_copy(update={"verify": (base / source.http.verify).resolve()})
    return source.model_copy(update=update)
