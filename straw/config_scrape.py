"""The configuration of a web UI source (`kind: scrape`): pages, selectors, parsers, login.

Only shapes and checks live here; `adapters/scrape` does the work. A selector
is CSS by default (a plain string) or `{xpath: ...}`; a field may instead name
a table `column` by its header text, which survives reordered columns.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from straw.config_types import Name, Seconds, StreamName, Strict, TimeZone
from straw.schedule import Scheduled


class ParseType(StrEnum):
    TEXT = "text"
    INTEGER = "integer"
    DECIMAL = "decimal"  # locale number: 1.234,56 / 1,234.56 / (12.00)
    CURRENCY = "currency"  # a decimal with a currency symbol or code around it
    DATE = "date"
    DATETIME = "datetime"
    BOOLEAN = "boolean"


class ParseSpec(Strict):
    type: ParseType
    locale: str = Field(default="en", description="number separators and month names, e.g. 'nl', 'da', 'en_US'")
    decimal: Literal[".", ","] | None = Field(
        default=None, description="decimal separator; overrides the locale's"
    )
    format: str | list[str] | None = Field(
        default=None,
        description="date/datetime: strptime format, e.g. '%d-%m-%Y' or '%d. %b %Y'; a list: tried in order",
    )
    relative: bool = Field(
        default=False,
        description="date/datetime: also read '5 minutes ago', 'yesterday', '3 days ago' against the fetch time",
    )
    true: list[str] = Field(default_factory=list, description="boolean: words meaning true (besides the usual)")
    false: list[str] = Field(default_factory=list, description="boolean: words meaning false (besides the usual)")

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value.replace("-", "_"))
        except (UnknownLocaleError, ValueError):
            raise PydanticCustomError(
                "locale", "unknown locale '{value}'; use a code such as 'en', 'nl', 'de_DE'", {"value": value}
            ) from None
        return value

    @model_validator(mode="after")
    def _dates_only(self) -> ParseSpec:
        dated = self.type in (ParseType.DATE, ParseType.DATETIME)
        for key, given in (("format", self.format is not None), ("relative", self.relative)):
            if given and not dated:
                raise PydanticCustomError(
                    "parse", "`{key}` is for `type: date` or `datetime`, not `{type}`",
                    {"key": key, "type": str(self.type), "at": (key,)},
                )
        if isinstance(self.format, list) and not self.format:
            raise PydanticCustomError("parse", "`format`: give at least one format", {"at": ("format",)})
        return self

    @property
    def formats(self) -> list[str]:
        """The configured strptime formats, in the order they are tried (empty: ISO 8601)."""
        return [self.format] if isinstance(self.format, str) else list(self.format or [])

    def describe(self) -> str:
        """How a value is read, for error messages: the format(s) and the locale."""
        match self.type:
            case ParseType.DATE | ParseType.DATETIME:
                how = " or ".join(repr(f) for f in self.formats) if self.formats else "ISO 8601"
                how = f"format {how}" + (" or a relative date" if self.relative else "")
            case ParseType.INTEGER | ParseType.DECIMAL | ParseType.CURRENCY:
                how = f"decimal separator {self.decimal!r}" if self.decimal else ""
            case _:
                how = ""
        return ", ".join(x for x in (how, f"locale {self.locale!r}") if x)


def _parse_shorthand(value: Any) -> Any:
    if isinstance(value, dict):
        # YAML reads an unquoted `true:` / `false:` key as a boolean.
        return {({True: "true", False: "false"}.get(k, k) if isinstance(k, bool) else k): v for k, v in value.items()}
    return {"type": value} if isinstance(value, str) else value


class Locator(Strict):
    """Where on the page: one of `css` or `xpath`."""

    css: str | None = None
    xpath: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Locator:
        if (self.css is None) == (self.xpath is None):
            raise PydanticCustomError("selector", "give exactly one of `css` or `xpath`", {})
        return self

    def __str__(self) -> str:
        return f"css {self.css!r}" if self.css is not None else f"xpath {self.xpath!r}"


def _css_shorthand(value: Any) -> Any:
    return {"css": value} if isinstance(value, str) else value


LocatorSpec = Annotated[Locator, BeforeValidator(_css_shorthand)]


class FieldRule(Strict):
    """One item field: where it is, which part of it, how to read it."""

    css: str | None = None
    xpath: str | None = None
    column: str | None = Field(default=None, description="the cell under this table header (row must be a <tr>)")
    attr: str | None = Field(default=None, description="read this attribute instead of the text")
    regex: str | None = Field(default=None, description="keep the first group (or the whole match)")
    parse: Annotated[ParseSpec, BeforeValidator(_parse_shorthand)] | None = None
    required: bool = Field(
        default=False, description="matching nothing, empty text, no regex match or a parse failure is layout drift"
    )
    multiline: bool = Field(default=False, description="keep line breaks (<br>, blocks, newlines); trim each line")
    null_if: list[str] | None = Field(
        default=None, description="texts meaning 'no value' (case-insensitive), e.g. ['--', 'n/a']; "
        "replaces the source's `null_if`"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> FieldRule:
        if sum(x is not None for x in (self.css, self.xpath, self.column)) != 1:
            raise PydanticCustomError("selector", "give exactly one of `css`, `xpath` or `column`", {})
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise PydanticCustomError(
                    "regex", "not a valid regular expression: {error}", {"error": str(exc), "at": ("regex",)}
                ) from None
        return self

    def describe(self) -> str:
        where = (
            f"css {self.css!r}" if self.css is not None
            else f"xpath {self.xpath!r}" if self.xpath is not None
            else f"column {self.column!r}"
        )
        return where + (f" @{self.attr}" if self.attr else "") + (f" /{self.regex}/" if self.regex else "")


Fields = dict[str, Annotated[FieldRule, BeforeValidator(_css_shorthand)]]


class Pagination(Strict):
    next: LocatorSpec | None = Field(
        default=None, description="the 'next page' link: followed (href), posted back (__doPostBack) or clicked"
    )
    pages: LocatorSpec | None = Field(default=None, description="page-number links; each page is read once")
    max_pages: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _some(self) -> Pagination:
        if self.next is None and self.pages is None:
            raise PydanticCustomError("pagination", "give `next` (a next-page link) or `pages` (page links)", {})
        return self


class ListSpec(Strict):
    url: str
    rows: LocatorSpec
    fields: Fields = Field(min_length=1)
    min_rows: int = Field(
        default=1, ge=0, description="fewer rows on the first page is layout drift; 0 allows an empty list"
    )
    pagination: Pagination | None = None
    wait: Seconds = Field(default=5.0, description="browser mode: how long rows may take to appear after load")


class DetailSpec(Strict):
    link: Annotated[FieldRule, BeforeValidator(_css_shorthand)] = Field(
        description="in the row: the link to the detail page (its href unless `attr` says otherwise)"
    )
    fields: Fields = Field(min_length=1)


class LoginSuccess(Strict):
    selector: LocatorSpec | None = None
    url_contains: str | None = None

    @model_validator(mode="after")
    def _some(self) -> LoginSuccess:
        if self.selector is None and self.url_contains is None:
            raise PydanticCustomError("login_success", "give `selector` or `url_contains` (or both)", {})
        return self


class LoginWhen(StrEnum):
    CHALLENGED = "challenged"  # when a page answers 401/403, redirects to `url` or shows the login form
    ALWAYS = "always"  # at the start of every run, too


class LoginSpec(Strict):
    url: str = Field(description="the page with the login form, relative to base_url ('.' is base_url itself)")
    form: str | None = Field(
        default=None,
        description="CSS of the login form; default: the form holding every input of `fields` and a password box",
    )
    fields: dict[str, str] = Field(min_length=1, description="input name -> value; put secrets in ${ENV_VAR}")
    submit: str | None = Field(default=None, description="browser mode: CSS of the button to click")
    success: LoginSuccess
    when: LoginWhen = LoginWhen.CHALLENGED
    session_file: Path | None = Field(
        default=None, description="keep cookies here between runs (written owner-only)"
    )

    @property
    def form_css(self) -> str:
        return self.form or "form"


class BasicAuth(Strict):
    username: str
    password: str


class HttpSpec(Strict):
    timeout: Seconds = 20.0
    verify: bool | Path = Field(default=True, description="false, or a CA bundle file for intranet certificates")
    basic_auth: BasicAuth | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    retries: int = Field(default=3, ge=0, le=20, description="on timeouts, connection errors and 5xx")
    backoff: Seconds = 0.5
    concurrency: int = Field(
        default=4, ge=1, le=64, description="detail pages fetched (static) or rendered in tabs (browser) at once"
    )
    rate_limit: float | None = Field(default=None, gt=0, description="requests per second at most")
    encoding: str | None = Field(default=None, description="force a page encoding, e.g. windows-1252")


class ScrapeMode(StrEnum):
    STATIC = "static"
    BROWSER = "browser"


class ScrapeSourceSpec(Scheduled):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Name
    kind: Literal["scrape"]
    mode: ScrapeMode = ScrapeMode.STATIC
    base_url: str = Field(description="page URLs below are relative to this")
    entity: str
    stream: StreamName
    mapping: dict[str, str] = Field(
        default_factory=dict, description="entity field -> item field; unmapped fields use their own name"
    )
    http: HttpSpec = HttpSpec()
    login: LoginSpec | None = None
    listing: ListSpec = Field(alias="list")  # `list` in the file; as an attribute it would shadow the type
    detail: DetailSpec | None = None
    timezone: TimeZone = "UTC"
    null_if: list[str] = Field(
        default_factory=list, description="texts meaning 'no value' in every field without its own `null_if`"
    )
    poll_interval: Seconds = 300.0
    batch_size: int = Field(default=500, ge=1, le=100_000)
    browser_executable: Path = Path("/usr/bin/chromium")
    debug_dir: Path = Field(default=Path("var/debug"), description="pages that broke a run are saved here")

    @property
    def encoding(self) -> str:
        return "utf-8"  # pages are decoded to text while fetched (see adapters/scrape/page.py)

    @property
    def max_rows_per_poll(self) -> None:
        # A scrape run always reads the whole listing; the runner need not come back for more.
        return None



    @model_validator(mode="after")
    def _fields_unique(self) -> ScrapeSourceSpec:
        if self.detail is not None:
            both = sorted(set(self.listing.fields) & set(self.detail.fields))
            if both:
                raise PydanticCustomError(
                    "duplicate", "field(s) {both} are read on both the list and the detail page; keep one",
                    {"both": ", ".join(both), "at": ("detail", "fields", both[0])},
                )
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def item_fields(self) -> list[str]:
        return [*self.listing.fields, *(self.detail.fields if self.detail else {})]
