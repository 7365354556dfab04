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
    type: ParseType = Field(
        description="`integer`, `decimal`, `currency`, `date`, `datetime`, `boolean` or `text`; a parse may be just "
        "its type: `parse: integer`"
    )
    locale: str = Field(default="en", description="number separators and month names, e.g. 'nl', 'da', 'en_US'")
    decimal: Literal[".", ","] | None = Field(
        default=None, description="decimal separator; overrides the locale's"
    )
    format: str | list[str] | None = Field(
        default=None,
        description="date/datetime: a strptime format (`%d-%m-%Y`, `%d. %b %Y`), or a list of them tried in order",
        json_schema_extra={"x-default": "ISO 8601"},
    )
    relative: bool = Field(
        default=False,
        description="date/datetime: also read `5 minutes ago`, `yesterday`, `3 days ago`, `vor 3 Tagen`, counted "
        "back from the fetch time (see **Relative dates**)",
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


ParseSpecOrType = Annotated[ParseSpec, BeforeValidator(_parse_shorthand, json_schema_input_type=ParseType | ParseSpec)]
LocatorSpec = Annotated[Locator, BeforeValidator(_css_shorthand, json_schema_input_type=str | Locator)]


class FieldRule(Strict):
    """One item field: where it is, which part of it, how to read it."""

    css: str | None = Field(default=None, description="CSS selector, relative to the row (the page, for detail fields)")
    xpath: str | None = Field(default=None, description="XPath, relative to the row (the page, for detail fields)")
    column: str | None = Field(
        default=None,
        description="the cell under this table header (survives reordered columns; the row must be a `<tr>`)",
    )
    attr: str | None = Field(default=None, description="read this attribute instead of the text")
    regex: str | None = Field(default=None, description="keep the first group (or the whole match)")
    parse: ParseSpecOrType | None = None
    required: bool = Field(
        default=False, description="matching nothing, empty text, no regex match or a parse failure is layout drift"
    )
    multiline: bool = Field(
        default=False, description="keep line breaks (`<br>`, blocks, newlines; see **Field rules**); trim each line"
    )
    null_if: list[str] | None = Field(
        default=None,
        description="texts that mean \"no value\" (`['- no selection -', 'n/a']`), compared whitespace-collapsed and "
        "case-insensitively, before and after `regex`; the field's list replaces the source's (`[]`: none)",
        json_schema_extra={"x-default": "the source's `null_if`"},
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


FieldRuleSpec = Annotated[FieldRule, BeforeValidator(_css_shorthand, json_schema_input_type=str | FieldRule)]
Fields = dict[str, FieldRuleSpec]


class Pagination(Strict):
    next: LocatorSpec | None = Field(
        default=None, description="the 'next page' link: followed (href), posted back (`__doPostBack`) or clicked"
    )
    pages: LocatorSpec | None = Field(default=None, description="page-number links, each page read once")
    max_pages: int = Field(default=1000, ge=1, description="stop after this many pages")

    @model_validator(mode="after")
    def _some(self) -> Pagination:
        if self.next is None and self.pages is None:
            raise PydanticCustomError("pagination", "give `next` (a next-page link) or `pages` (page links)", {})
        return self


class ListSpec(Strict):
    url: str = Field(description="the first list page, relative to `base_url`")
    rows: LocatorSpec = Field(description="one row per match (CSS string or `{xpath: …}`)")
    fields: Fields = Field(
        min_length=1,
        description="a CSS string, or `{css | xpath | column, attr, regex, parse, required, multiline, null_if}`",
    )
    min_rows: int = Field(
        default=1, ge=0, description="fewer rows on the first page is layout drift; `0` allows an empty listing"
    )
    pagination: Pagination | None = Field(
        default=None, description="`next` (a next-page link) or `pages` (page-number links), and `max_pages`"
    )
    wait: Seconds = Field(
        default=5.0, description="browser mode: how long rows may take to appear after the page loaded"
    )


class DetailSpec(Strict):
    link: FieldRuleSpec = Field(
        description="in the row: the link to the detail page (its href unless `attr` says otherwise)"
    )
    fields: Fields = Field(min_length=1, description="fields read on the detail page")


class LoginSuccess(Strict):
    selector: LocatorSpec | None = Field(default=None, description="must be on the page after login")
    url_contains: str | None = Field(default=None, description="the URL after login must contain this")

    @model_validator(mode="after")
    def _some(self) -> LoginSuccess:
        if self.selector is None and self.url_contains is None:
            raise PydanticCustomError("login_success", "give `selector` or `url_contains` (or both)", {})
        return self


class LoginWhen(StrEnum):
    CHALLENGED = "challenged"  # when a page answers 401/403, redirects to `url` or shows the login form
    ALWAYS = "always"  # at the start of every run, too


class LoginSpec(Strict):
    url: str = Field(
        description="the page showing the login form, relative to `base_url`; `\".\"` is `base_url` itself"
    )
    form: str | None = Field(
        default=None,
        description="CSS of the login form; it must hold every input named in `fields`",
        json_schema_extra={"x-default": "the form with every `fields` input and a password box"},
    )
    fields: dict[str, str] = Field(
        min_length=1,
        description="input name → value; other inputs of the form (hidden fields, CSRF tokens) are sent as found. "
        "Secrets in `${ENV_VAR}`",
    )
    submit: str | None = Field(
        default=None, description="browser mode: CSS of the button to click",
        json_schema_extra={"x-default": "the form's submit button"},
    )
    success: LoginSuccess = Field(description="`selector` that must be on the page after login, and/or `url_contains`")
    when: LoginWhen = Field(
        default=LoginWhen.CHALLENGED,
        description="`challenged`: log in when a page answers 401/403, redirects to `login.url` or shows the login "
        "form; `always`: also at the start of every run",
    )
    session_file: Path | None = Field(
        default=None, description="keep the session between runs (see [Logging in](#logging-in)), mode 0600"
    )

    @property
    def form_css(self) -> str:
        return self.form or "form"


class BasicAuth(Strict):
    username: str = Field(description="HTTP basic auth user")
    password: str = Field(description="HTTP basic auth password; put it in ${ENV_VAR}")


class HttpSpec(Strict):
    timeout: Seconds = Field(default=20.0, description="per request")
    verify: bool | Path = Field(
        default=True, description="`false`, or a CA bundle file (relative to this file) for intranet certificates"
    )
    basic_auth: BasicAuth | None = Field(default=None, description="`{username, password}`")
    headers: dict[str, str] = Field(default_factory=dict, description="extra request headers")
    retries: int = Field(default=3, ge=0, le=20, description="tries again on timeouts, connection errors and 5xx, "
                         "with exponential backoff")
    backoff: Seconds = Field(default=0.5, description="first wait before a retry; doubles each time (at most 30 s)")
    concurrency: int = Field(
        default=4, ge=1, le=64,
        description="detail pages fetched at once (static: threads; browser: tabs of one browser context, see "
        "**Fetching**). Static sources on one server share one connection pool and rate: the smallest of their values",
    )
    rate_limit: float | None = Field(
        default=None, gt=0, description="requests per second, at most (shared like `concurrency`)"
    )
    encoding: str | None = Field(
        default=None,
        description="force a page encoding; otherwise beautifulsoup4's `UnicodeDammit` tries, each strictly: a byte "
        "order mark, the header's charset, the page's `<meta>` or XML declaration, then UTF-8, then windows-1252 (a "
        "declared latin-1 is read as windows-1252, as browsers do), then detection; see **Encodings**",
    )


class ScrapeMode(StrEnum):
    STATIC = "static"
    BROWSER = "browser"


class ScrapeSourceSpec(Scheduled):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: Name = Field(description="unique source name")
    kind: Literal["scrape"] = Field(description="`scrape`: a web UI source")
    mode: ScrapeMode = Field(
        default=ScrapeMode.STATIC,
        description="`static`: httpx + lxml; `browser`: Playwright driving `browser_executable`",
    )
    base_url: str = Field(description="base of every relative URL")
    entity: str = Field(description="which entity (under `entities`) the items become")
    stream: StreamName = Field(description="the stream they go to")
    mapping: dict[str, str] = Field(
        default_factory=dict, description="`entity field: item field` where the names differ"
    )
    http: HttpSpec = HttpSpec()
    login: LoginSpec | None = Field(default=None, description="how to log in when the UI asks (see Logging in)")
    # `list` in the file; as an attribute it would shadow the type
    listing: ListSpec = Field(alias="list", description="the listing: its first page, rows, fields and pagination")
    detail: DetailSpec | None = Field(
        default=None, description="a field rule for the row's detail link (its `href`), and fields read there"
    )
    timezone: TimeZone = Field(
        default="UTC", description="the zone naive dates and times of the pages are in; relative dates count back in it"
    )
    null_if: list[str] = Field(
        default_factory=list, description="the default `null_if` of every field"
    )
    poll_interval: Seconds = Field(default=300.0, description="time between runs")
    batch_size: int = Field(default=500, ge=1, le=100_000, description="rows per outbox transaction")
    browser_executable: Path = Field(
        default=Path("/usr/bin/chromium"),
        description="Debian: `apt-get install chromium`; `pip install 'straw[browser]'` for Playwright",
    )
    debug_dir: Path = Field(
        default=Path("var/debug"), description="where a page that broke a run is saved (folder 0700, files 0600)"
    )

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
