"""The README's key tables are generated from the models: they agree, and regenerating touches nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field

from straw import docs_gen
from straw.config_types import Seconds, Strict

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_tables_are_the_ones_the_models_make() -> None:
    text = README.read_text(encoding="utf-8")
    names = re.findall(r"<!-- keys:([\w-]+) -->", text)
    assert sorted(names) == sorted(docs_gen.TABLES)  # every table generated, each once
    assert docs_gen.render(text) == text, "README key tables are stale: run python -m straw.docs_gen"
    assert docs_gen.main(["--check"]) == 0


def test_every_key_has_a_description() -> None:
    assert docs_gen.undocumented() == []


class _Inner(Strict):
    every: Seconds = Field(default=90.0, description="how often")


class _Model(Strict):
    name: str = Field(description="a | name")
    inner: _Inner = _Inner()
    things: dict[str, _Inner] = Field(default_factory=dict, description="named things")
    optional: int | None = None


def test_a_model_becomes_rows_with_defaults_as_the_file_writes_them() -> None:
    rows = docs_gen.rows(docs_gen.TableSpec(_Model))
    assert [(r.key, r.default, r.meaning) for r in rows] == [
        ("`name`", "required", "a | name"),
        ("`inner.every`", "`90s`", "how often"),  # a duration as the file writes it
        ("`things.<thing>`", "`{}`", "named things (keys as `inner`)"),  # a shape seen before: one row
        ("`optional`", "none", ""),
    ]
    table = docs_gen.table(docs_gen.TableSpec(_Model))
    assert "| `name` | required | a \\| name |" in table  # a pipe in a description does not break the table
    assert "| `optional` | none |  |" in table
    assert [format(docs_gen.format_duration(s)) for s in (0, 0.2, 5, 90, 300, 3600, 1.5)] == [
        "0", "200ms", "5s", "90s", "5m", "1h", "1500ms"]


def test_regenerating_rewrites_only_between_markers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(docs_gen, "TABLES", {"model": docs_gen.TableSpec(_Model)})
    readme = tmp_path / "README.md"
    before = "# title\n\n| not | ours |\n\n<!-- keys:model -->\n| stale |\n<!-- /keys -->\n\nafter | text\n"
    readme.write_text(before)
    assert docs_gen.main(["--check", "--readme", str(readme)]) == 1  # stale: the check fails
    docs_gen.main(["--readme", str(readme)])  # exit 1 all the same: `optional` has no description
    text = readme.read_text()
    assert text.startswith("# title\n\n| not | ours |\n\n<!-- keys:model -->\n| key | default | meaning |\n")
    assert text.endswith("<!-- /keys -->\n\nafter | text\n")
    assert "| `inner.every` | `90s` | how often |" in text
    assert docs_gen.render(text) == text  # generating again changes nothing
    assert docs_gen.main(["--check", "--readme", str(readme)]) == 1  # still: a key without a description


def test_an_unknown_marker_is_an_error_naming_it() -> None:
    with pytest.raises(KeyError, match="keys:nosuch"):
        docs_gen.render("<!-- keys:nosuch -->\n<!-- /keys -->\n")
