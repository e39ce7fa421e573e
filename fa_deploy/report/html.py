"""`fa-bench --report DIR`: one self-contained HTML page (tables, and the PNGs embedded as data URIs, so the
file can be mailed or archived alone) and the same content as Markdown (`report.md`, linking the PNGs in DIR)."""
from __future__ import annotations

import base64
import datetime
import html
import os
from typing import Dict, List, Optional, Sequence, Tuple

from fa_deploy.report.tables import _fmt, markdown_table

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1500px;
       color: #222; padding: 0 1em; }
.scroll { overflow-x: auto; max-width: 100%; margin: 0.5em 0 1.5em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.pass { color: #080; font-weight: bold; } .fail { color: #b00; font-weight: bold; }
.inconclusive { color: #a60; font-weight: bold; }
"""

# marks the page when every image has decoded: <body data-images-loaded="N" data-images-total="M">
ONLOAD = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-loaded', ok);
  document.body.setAttribute('data-images-total', imgs.length);
  // a table whose right edge lies outside the window and that cannot scroll is cut for the reader
  var tables = document.getElementsByTagName('table'), cut = 0;
  for (var j = 0; j < tables.length; j++) {
    var box = tables[j].parentElement, scrolls = box && box.className === 'scroll' && box.scrollWidth > box.clientWidth;
    if (!scrolls && tables[j].getBoundingClientRect().right > window.innerWidth) cut++;
  }
  document.body.setAttribute('data-tables-cut', cut);
});
"""

Table = Tuple[str, List[Dict], Sequence[str]]  # caption, rows, columns
Figure = Tuple[str, str]  # caption, PNG path


def _html_table(rows: List[Dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


def write_report(out_dir: str, title: str, tables: Sequence[Table], figures: Sequence[Figure],
                 notes: Sequence[str] = (), verdict: Optional[Tuple[str, str, str]] = None) -> Dict[str, str]:
    """Writes DIR/report.html (self-contained) and DIR/report.md; returns their paths. `verdict`: (what was
    checked, e.g. "gate (max drop 0.02)"; PASS, FAIL or INCONCLUSIVE; the reasons, "" when none)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style><script>{ONLOAD}</script></head><body>",
             f"<h1>{html.escape(title)}</h1><p>fa-toolkit, {stamp}</p>"]
    md = [f"# {title}", "", f"fa-toolkit, {stamp}", ""]
    if verdict:
        what, outcome, why = verdict
        if outcome not in VERDICTS:
            raise ValueError(f"verdict {outcome!r}: one of {VERDICTS}")
        parts.append(f"<p>{html.escape(what[:1].upper() + what[1:])}: <span class='{outcome.lower()}'>{outcome}</span>"
                     + (f" {html.escape(why)}" if why else "") + "</p>")
        md += [f"{what[:1].upper() + what[1:]}: **{outcome}**" + (f" {why}" if why else ""), ""]
    for note in notes:
        parts.append(f"<p>{html.escape(note)}</p>")
        md += [note, ""]
    for caption, rows, columns in tables:
        parts.append(f"<h2>{html.escape(caption)}</h2>{_html_table(rows, columns)}")
        md += [f"## {caption}", "", markdown_table(rows, columns), ""]
    if figures:
        parts.append("<h2>Figures</h2>")
        md += ["## Figures", ""]
    for caption, path in figures:
        parts.append(f"<figure><img src='{_data_uri(path)}' alt='{html.escape(caption)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        rel = os.path.relpath(path, out_dir)
        md += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    parts.append("</body></html>")
    paths = {"html": os.path.join(out_dir, "report.html"), "markdown": os.path.join(out_dir, "report.md")}
    for key, text in (("html", "\n".join(parts)), ("markdown", "\n".join(md))):
        tmp = paths[key] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, paths[key])
    return paths
