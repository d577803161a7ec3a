"""Rendering: the section dicts the report builders return, the small context object the
templates see (``Page``: the anomaly banner, sections, tables as rows of strings with grouped
headers, figures as PNG paths, notes) and the jinja2 templates that turn one ``Page`` into
``index.html`` and ``README.md``."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import jinja2
import pandas as pd

TEMPLATES = Path(__file__).parent.parent / "templates"


class Section(TypedDict, total=False):
    """One report section as the builders return it. ``task``: its task (or title); ``heading``:
    the title shown ("Task: <task>" when absent); ``context``: how it was measured; ``verdict``:
    the ranked verdict table shown first (a ``TableView``, caption included); ``table``:
    formatted strings, one row per index entry (two-level columns = grouped headers);
    ``index_label``: the header of the index column; ``css``: the table's class; ``more``:
    further (css class, DataFrame) tables shown right after ``table`` (e.g. the full table's
    cost columns, so each part fits the page); ``collapse``: the summary line of a collapsible
    block holding ``table`` and ``more`` (shown open when absent);
    ``tables``: further (title, DataFrame) pairs; ``notes``; ``figures``: (PNG file name,
    caption) pairs, or (name, caption, css class) triples ("wide": the page's full width);
    ``configuration``: the configuration each method ran with (``report.configuration``),
    shown collapsed after the full table."""
    task: str
    heading: str
    context: str
    verdict: TableView | None
    table: pd.DataFrame
    index_label: str
    css: str
    more: list[tuple[str, pd.DataFrame]]
    collapse: str
    tables: list[tuple[str, pd.DataFrame]]
    notes: list[str]
    figures: Sequence[tuple[str, ...]]
    configuration: TableView | None


def _cell(v: Any) -> str:
    if v is None or (not isinstance(v, (str, list, dict, tuple)) and pd.isna(v)):
        return "–"
    return str(v)


@dataclass(frozen=True)
class TableView:
    """A table as the templates see it: header cells and rows of strings. ``groups``: grouped
    headers above the columns as (label, number of columns) runs ("" = no group), empty for a
    single header row; ``row_ids`` / ``row_css``: an anchor and a class per row ("" = none);
    ``caption``: what the table shows and how it was computed."""
    columns: list[str]
    rows: list[list[str]]
    css: str = ""
    groups: list[tuple[str, int]] = field(default_factory=list)
    row_ids: list[str] = field(default_factory=list)
    row_css: list[str] = field(default_factory=list)
    caption: str = ""

    @classmethod
    def from_frame(cls, df: pd.DataFrame, index_label: str | None = None, css: str = "", caption: str = "",
                   row_ids: list[str] | None = None, row_css: list[str] | None = None) -> TableView:
        """``df`` as strings; its index becomes the first column when ``index_label`` is given.
        Two-level columns ((group, header) pairs) become grouped headers."""
        if isinstance(df.columns, pd.MultiIndex):
            tops, cols = [str(c[0]) for c in df.columns], [str(c[-1]) for c in df.columns]
        else:
            tops, cols = [], [str(c) for c in df.columns]
        body = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
        if index_label is not None:
            cols = [index_label] + cols
            tops = [""] + tops if tops else []
            body = [[str(i)] + r for i, r in zip(df.index, body)]
        return cls(cols, body, css, groups=_runs(tops), row_ids=list(row_ids or []), row_css=list(row_css or []),
                   caption=caption)

    def row_id(self, i: int) -> str:
        return self.row_ids[i] if i < len(self.row_ids) else ""

    def row_class(self, i: int) -> str:
        return self.row_css[i] if i < len(self.row_css) else ""

    def md_groups(self) -> str:
        """The grouped headers as one line for Markdown (which has no spanning cells): "group:
        first column – last column" per group; "" without groups."""
        if not self.groups:
            return ""
        parts, start = [], 0
        for label, n in self.groups:
            if label:
                cols = self.columns[start:start + n]
                parts.append(f"{label}: {cols[0]}" + (f" – {cols[-1]}" if n > 1 else ""))
            start += n
        return "; ".join(parts)


def _runs(tops: list[str]) -> list[tuple[str, int]]:
    """Consecutive runs of equal group labels; empty when no column has a group."""
    if not any(tops):
        return []
    runs: list[tuple[str, int]] = []
    for t in tops:
        if runs and runs[-1][0] == t:
            runs[-1] = (t, runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


@dataclass(frozen=True)
class FigureView:
    src: str
    caption: str
    css: str = ""


@dataclass(frozen=True)
class SectionView:
    anchor: str
    heading: str
    context: str
    table: TableView | None
    tables: list[tuple[str, TableView]]
    notes: list[str]
    figures: list[FigureView]
    verdict: TableView | None = None
    more: list[TableView] = field(default_factory=list)
    collapse: str = ""
    md_anchor: str = ""
    configuration: TableView | None = None


@dataclass(frozen=True)
class BannerItem:
    """One anomaly of the banner: its kind (a short label), the sentence, and the anchor (HTML
    id, without "#") of where it is; ``md_anchor``: the Markdown page's link target."""
    kind: str
    text: str
    anchor: str
    md_anchor: str = ""


@dataclass(frozen=True)
class Page:
    """Everything one page shows, in order: title, the anomaly banner (None = no banner, e.g. a
    comparison page), regressions (None = not a nightly page), introductory paragraphs, runs
    without results, sections, package versions."""
    title: str
    intro: list[str] = field(default_factory=list)
    regressions: list[str] | None = None
    status: TableView | None = None
    unmeasured: TableView | None = None  # measurements that finished points did not take, why
    sections: list[SectionView] = field(default_factory=list)
    versions: str | None = None
    banner: list[BannerItem] | None = None


def slug(s: str) -> str:
    """A file-name and anchor-safe version of ``s``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def md_anchor(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's rule) gives a heading: lower case, punctuation
    dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section_heading(s: Section) -> str:
    return s.get("heading") or f"Task: {s.get('task', '')}"


def section_anchor(task: str) -> str:
    """The HTML id of the section of ``task`` (or of a section titled ``task``)."""
    return slug(task)


def section_view(s: Section) -> SectionView:
    """The template view of a section dict."""
    table = s.get("table")
    view = (TableView.from_frame(table, s.get("index_label", "method"), s.get("css", ""))
            if table is not None and len(table) else None)
    heading = section_heading(s)
    return SectionView(anchor=section_anchor(s.get("task", "")), heading=heading,
                       context=s.get("context", ""), table=view,
                       tables=[(title, TableView.from_frame(t, str(t.index.name or "")))
                               for title, t in s.get("tables", [])],
                       notes=list(s.get("notes") or []),
                       figures=[FigureView(*f) for f in s.get("figures", [])],
                       verdict=s.get("verdict"), collapse=s.get("collapse", ""), md_anchor=md_anchor(heading),
                       configuration=s.get("configuration"),
                       more=[TableView.from_frame(t, s.get("index_label", "method"), css)
                             for css, t in s.get("more", []) if len(t)])


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
