"""Which form on a login page gets the credentials, and where they may go: shared by both modes.

The credentials go only into a form that asks for them (every configured input, and a password
box unless `login.form` names the form), only by POST (a GET puts them in the URL, hence in
every access log and proxy log on the way), and only to the login page's own origin (scheme,
host and port: never to another host, never from an HTTPS page to plain HTTP).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from adapters.scrape.errors import LoginFailed
from adapters.scrape.page import Node, Page, css, elements, strings
from straw.config_scrape import LoginSpec


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), f"{(parts.hostname or '').lower()}:{parts.port or default}"


def same_page(url: str, other: str) -> bool:
    """Same origin and path, whatever the query: `/login?next=/orders` is the login page."""
    return origin(url) == origin(other) and (urlsplit(url).path or "/") == (urlsplit(other).path or "/")


def form_fits(form: Node, spec: LoginSpec) -> bool:
    names = set(strings(form, ".//input/@name | .//select/@name | .//textarea/@name"))
    if not set(spec.fields) <= names:
        return False
    return spec.form is not None or bool(elements(form, ".//input[@type='password' or @type='PASSWORD']"))


def login_form(source: str, page: Page, spec: LoginSpec) -> int:
    """The index, among the matches of `login.form` (default: every form), of the form to fill."""
    forms = css(page.tree, spec.form_css)
    for index, form in enumerate(forms):
        if form_fits(form, spec):
            return index
    wanted = ", ".join(sorted(spec.fields)) + ("" if spec.form else " and a password box")
    tried = f"`login.form` {spec.form!r}" if spec.form else "every form (no `login.form` given)"
    raise LoginFailed(
        f"source {source!r}: no login form on {page.url}: tried {tried}, {len(forms)} form(s) matched, "
        f"none with inputs {wanted}; check `login.url`, `login.form` and the input names in `login.fields`"
    )


def check_submission(source: str, page_url: str, method: str, action: str) -> None:
    """Refuse to send credentials anywhere but by POST to the login page's own origin."""
    if method.upper() != "POST":
        raise LoginFailed(
            f"source {source!r}: the login form on {page_url} is sent with {method.upper()}, which would put "
            "the credentials in the URL; refusing to send them (set `login.form` to the form that POSTs)"
        )
    if origin(action) != origin(page_url):
        scheme, host = origin(action)
        raise LoginFailed(
            f"source {source!r}: the login form on {page_url} is sent to {scheme}://{host}, another origin "
            "than the login page's; refusing to send the credentials there"
        )
