"""Rendering: the section dicts the report builders return, the small context object the
templates see (``Page``: sections, tables as rows of strings, figures as PNG paths, notes) and
the jinja2 templates that turn one ``Page`` into ``index.html`` and ``README.md``."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import jinja2
import pandas as pd

TEMPLATES = Path(__file__).with_name("templates")


class Section(TypedDict, total=False):
    """One report section as the builders return it. ``task``: its task (or title); ``heading``:
    the title shown ("Task: <task>" when absent); ``context``: how it was measured; ``table``:
    formatted strings, one row per index entry; ``index_label``: the header of the index column;
    ``css``: the table's class; ``tables``: further (title, DataFrame) pairs; ``notes``;
    ``figures``: (PNG file name, caption) pairs."""
    task: str
    heading: str
    context: str
    table: pd.DataFrame
    index_label: str
    css: str
    tables: list[tuple[str, pd.DataFrame]]
    notes: list[str]
    figures: list[tuple[str, str]]


def _cell(v: Any) -> str:
    if v is None or (not isinstance(v, (str, list, dict, tuple)) and pd.isna(v)):
        return "–"
    return str(v)


@dataclass(frozen=True)
class TableView:
    """A table as the templates see it: header cells and rows of strings."""
    columns: list[str]
    rows: list[list[str]]
    css: str = ""

    @classmethod
    def from_frame(cls, df: pd.DataFrame, index_label: str | None = None, css: str = "") -> TableView:
        """``df`` as strings; its index becomes the first column when ``index_label`` is given."""
        cols = [str(c) for c in df.columns]
        body = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
        if index_label is not None:
            cols = [index_label] + cols
            body = [[str(i)] + r for i, r in zip(df.index, body)]
        return cls(cols, body, css)


@dataclass(frozen=True)
class FigureView:
    src: str
    caption: str


@dataclass(frozen=True)
class SectionView:
    anchor: str
    heading: str
    context: str
    table: TableView | None
    tables: list[tuple[str, TableView]]
    notes: list[str]
    figures: list[FigureView]


@dataclass(frozen=True)
class Page:
    """Everything one page shows, in order: title, regressions (None = not a nightly page),
    introductory paragraphs, runs without results, sections, package versions."""
    title: str
    intro: list[str] = field(default_factory=list)
    regressions: list[str] | None = None
    status: TableView | None = None
    sections: list[SectionView] = field(default_factory=list)
    versions: str | None = None


def slug(s: str) -> str:
    """A file-name and anchor-safe version of ``s``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def section_view(s: Section) -> SectionView:
    """The template view of a section dict."""
    table = s.get("table")
    view = (TableView.from_frame(table, s.get("index_label", "method"), s.get("css", ""))
            if table is not None and len(table) else None)
    return SectionView(anchor=slug(s.get("task", "")), heading=s.get("heading") or f"Task: {s.get('task', '')}",
                       context=s.get("context", ""), table=view,
                       tables=[(title, TableView.from_frame(t, str(t.index.name or "")))
                               for title, t in s.get("tables", [])],
                       notes=list(s.get("notes") or []),
                       figures=[FigureView(n, c) for n, c in s.get("figures", [])])


def versions_text(versions: Any) -> str:
    return json.dumps(versions if versions is not None else {}, sort_keys=True, default=str)


def _md_cell(v: Any) -> str:
    """A Markdown table cell: pipes escaped (they would split the cell), no raw HTML tags."""
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                                                 default_for_string=False),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md_cell"] = _md_cell
    return env


def render(template: str, page: Page) -> str:
    """``templates/<template>`` rendered with ``page``."""
    return _environment().get_template(template).render(page=page)


def write_page(page: Page, out: Path) -> Path:
    """Write ``out/index.html`` and ``out/README.md`` of ``page``; returns the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(render("page.html.j2", page))
    (out / "README.md").write_text(render("page.md.j2", page))
    return out / "index.html"
