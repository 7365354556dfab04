"""Scrape source configuration: a complete example loads; mistakes name file, line, key and fix."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from straw.config_load import ConfigError, load_config
from straw.config_scrape import ScrapeMode, ScrapeSourceSpec

# Line numbers: 1 entities / 2 order / 3 key / 4 fields / 5 order_no / 6 amount / 7 sources / 8 - name
# 9 kind / 10 mode / 11 base_url / 12 entity / 13 stream / 14 login / 15 url / 16 fields / 17 UserName
# 18 success / 19 selector / 20 session_file / 21 list / 22 url / 23 rows / 24 fields / 25 order_no
# 26 amount / 27 column / 28 parse / 29 pagination / 30 next / 31 debug_dir
BASE = textwrap.dedent(
    """\
    entities:
      order:
        key: [order_no]
        fields:
          order_no: integer
          amount: decimal
    sources:
      - name: web
        kind: scrape
        mode: browser
        base_url: https://erp.intranet/
        entity: order
        stream: erp.orders
        login:
          url: login.aspx
          fields:
            UserName: alice
          success:
            selector: "#logout"
          session_file: var/web.session
        list:
          url: orders.aspx
          rows: "table#grid tr.row"
          fields:
            order_no: {xpath: "./td[1]", parse: integer, required: true}
            amount:
              column: Amount
              parse: {type: currency, locale: nl}
          pagination:
            next: {xpath: "//a[text()='Next']"}
        debug_dir: debug
    """
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "straw.yaml"
    path.write_text(text)
    return path


def test_complete_example_loads_with_paths_next_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE))
    spec = config.source("web")
    assert isinstance(spec, ScrapeSourceSpec)
    assert spec.mode is ScrapeMode.BROWSER
    assert spec.debug_dir == tmp_path.resolve() / "debug"
    assert spec.login is not None and spec.login.session_file == tmp_path.resolve() / "var/web.session"
    assert spec.listing.fields["order_no"].xpath == "./td[1]"
    assert spec.listing.fields["amount"].parse is not None and spec.listing.fields["amount"].parse.locale == "nl"
    assert spec.item_fields() == ["order_no", "amount"]


@pytest.mark.parametrize(
    ("old", "new", "line", "key", "message"),
    [
        ("    mode: browser\n", "    mode: chrome\n", 10, "sources[0].mode", "'static' or 'browser'"),
        ("          column: Amount\n", "          column: Amount\n          css: td.amt\n", 26,
         "sources[0].list.fields.amount", "exactly one of `css`, `xpath` or `column`"),
        ("          parse: {type: currency, locale: nl}\n",
         "          parse: {type: currency, locale: nl, decimals: 2}\n", 28,
         "sources[0].list.fields.amount.parse.decimals", "did you mean `decimal`?"),
        ("      pagination:\n        next: {xpath: \"//a[text()='Next']\"}\n",
         "      pagination:\n        max_pages: 3\n", 29, "sources[0].list.pagination", "give `next`"),
        ("      success:\n        selector: \"#logout\"\n", "      success: {}\n", 18,
         "sources[0].login.success", "give `selector` or `url_contains`"),
        ("    kind: scrape\n", "    kind: scraper\n", 9, "sources[0].kind", "'db', 'scrape'"),
    ],
)
def test_mistakes_name_the_line(tmp_path: Path, old: str, new: str, line: int, key: str, message: str) -> None:
    assert old in BASE
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problem = caught.value.problems[0]
    assert (problem.line, problem.key) == (line, key), str(problem)
    assert message in problem.message
    assert str(problem).startswith(f"{path}:{line}: ")


def test_a_field_read_on_list_and_detail_page_is_refused(tmp_path: Path) -> None:
    text = BASE + "    detail:\n      link: td a\n      fields:\n        amount: '#amount'\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert "read on both the list and the detail page" in str(caught.value)
    assert caught.value.problems[0].line == 35


def test_the_readme_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Web UI source (kind: scrape)", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    for var in ("ERP_PROXY_PWD", "ERP_USER", "ERP_PASSWORD"):
        monkeypatch.setenv(var, "x")
    spec = load_config(write(tmp_path, example)).source("erp-web-orders")
    assert isinstance(spec, ScrapeSourceSpec)
    assert spec.http.verify == Path("/etc/ssl/intranet-ca.pem")
    assert spec.detail is not None and spec.item_fields()[-2:] == ["status", "note"]
