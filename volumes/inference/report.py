"""The visual report of ``python -m volumes infer``: one HTML page over every case.

:func:`write_report` writes ``report.html``: a summary, the segmentations quality control
flagged for review (worst first), the failures, and one section per case with the
predictions of every bundle (classes as percent, organ volumes in mL with their QC flags,
links to the mask files, timings per stage) and the case's figure
(:mod:`volumes.inference.figures`). The page is
self-contained (inline CSS, no script, no external resource); images and masks are linked
by their path relative to the report, and every piece of text that comes from a case (ids,
file names, error messages) is HTML-escaped.
"""

from __future__ import annotations

import html
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from volumes.atomic import atomic_write_bytes

__all__ = ["write_report"]


# --------------------------------------------------------------------------- HTML report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { margin: 1em 0 0.3em; font-size: 1.05em; }
.meta, .muted { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.3em 0 0.8em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.predicted td { font-weight: 600; background: #eef5ff; }
.failures td { background: #fff3f3; }
.error { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; font-size: 0.88em; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.9em; }
section.case { border-top: 2px solid #888; margin-top: 2em; }
.bundle { display: inline-block; vertical-align: top; margin-right: 2em; }
img.figure { max-width: 100%; height: auto; border: 1px solid #ddd; }
nav ol { columns: 3; font-size: 0.92em; }
.qc { padding: 0 0.4em; border-radius: 0.3em; color: white; font-weight: 600; }
.qc.pass { background: #2e7d32; } .qc.review { background: #e65100; }
.flagged td { background: #fff6ec; }
"""


def _e(value: Any) -> str:
    """HTML-escaped ``str(value)`` (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _href(relative: Any) -> str:
    """A relative file path as an escaped URL: percent-encoded, so ``#``, ``?`` or ``:`` stay part of the name."""
    return _e(quote(str(relative).replace("\\", "/"), safe="/"))


def _number(value: Any, spec: str, unit: str = "") -> str:
    """``format(value, spec) + unit``, or ``"n/a"`` for anything that is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(number):
        return "n/a"
    return f"{number:{spec}}{unit}"


def _short(digest: Any, n: int = 12) -> str:
    """The first ``n`` characters of a hash, the full hash as a tooltip."""
    if not digest:
        return '<span class="muted">n/a</span>'
    text = str(digest)
    return f'<code title="{_e(text)}">{_e(text[:n])}</code>'


def _anchor(index: int, case_id: str) -> str:
    """A unique, valid HTML id for a case section."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", case_id).strip("-")[:60]
    return f"case-{index}-{slug}" if slug else f"case-{index}"


def _key_value_table(facts: Mapping[str, Any], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items())
    return f"<table{cls}>{body}</table>"


def _percent(p: Any) -> float | None:
    """A probability 0..1 as percent, None when it is not a number."""
    try:
        return float(p) * 100.0
    except (TypeError, ValueError):
        return None


def _classification_html(row: Mapping[str, Any]) -> str:
    probabilities = row.get("probabilities") or {}
    predicted = row.get("predicted")
    parts = [f"<p>Predicted: <strong>{_e(predicted) if predicted is not None else 'n/a'}</strong></p>"]
    if probabilities:

        def sort_key(item: tuple[str, Any]) -> float:
            try:
                value = float(item[1])
            except (TypeError, ValueError):
                return math.inf
            return -value if math.isfinite(value) else math.inf

        lines = []
        for name, p in sorted(probabilities.items(), key=sort_key):
            cls = ' class="predicted"' if predicted is not None and str(name) == str(predicted) else ""
            lines.append(f'<tr{cls}><td>{_e(name)}</td><td class="num">{_number(_percent(p), ".1f", "%")}</td></tr>')
        parts.append("<table><tr><th>class</th><th>probability</th></tr>" + "".join(lines) + "</table>")
    top = row.get("top_slices") or []
    if top:
        items = []
        for t in top:
            if isinstance(t, Mapping):
                imp = t.get("importance")
                extra = f" ({_number(imp, '.3g')})" if imp is not None else ""
                items.append(f"z={_e(t.get('slice', '?'))}{extra}")
            else:
                items.append(f"z={_e(t)}")
        parts.append(f"<p>Top slices: {', '.join(items)}</p>")
    return "".join(parts)



def _flag_html(flag: Any) -> str:
    flag = str(flag or "n/a")
    return f'<span class="qc {_e(flag)}">{_e(flag)}</span>'


def _segmentation_html(row: Mapping[str, Any]) -> str:
    volumes = row.get("organ_volumes_ml") or {}
    if not volumes:
        return '<p class="muted">No organ volumes.</p>'
    quality = row.get("quality") or {}
    organs = quality.get("organs") or {}
    head = "<tr><th>organ</th><th>volume (mL)</th>" + ("<th>QC</th><th>score</th><th>reasons</th>" if quality else "")
    lines = []
    for k, v in volumes.items():
        cells = f'<td>{_e(k)}</td><td class="num">{_number(v, ".1f")}</td>'
        if quality:
            o = organs.get(k, {})
            cells += (f"<td>{_flag_html(o.get('flag'))}</td><td class=\"num\">{_number(o.get('score'), '.1f')}</td>"
                      f"<td>{_e(', '.join(o.get('reasons') or []))}</td>")
        lines.append(f"<tr>{cells}</tr>")
    summary = ""
    if quality:
        summary = (f"<p>Quality control: {_flag_html(quality.get('flag'))} (score {_number(quality.get('score'), '.2f')}, "
                   f"threshold {_number(quality.get('threshold'), '.2f')}, image z {_number(quality.get('ood_z'), '.2f')})</p>")
    return f"{summary}<table>{head}</tr>{''.join(lines)}</table>"


def _flagged_html(rows: Sequence[Mapping[str, Any]], anchors: Mapping[str, str]) -> str:
    """The segmentations quality control flagged for review, worst first (the report's first table)."""
    checked = [r for r in rows if r.get("quality")]
    if not checked:
        return ""
    flagged = sorted((r for r in checked if r["quality"].get("flag") == "review"),
                     key=lambda r: -float(r["quality"].get("score") or 0.0))
    parts = [f'<section id="quality"><h2>Flagged for review ({len(flagged)} of {len(checked)} segmentations)</h2>']
    if not flagged:
        parts.append("<p>Quality control passed every segmentation.</p></section>")
        return "".join(parts)
    lines = []
    for r in flagged:
        case_id = str(r.get("case_id", ""))
        name = f'<a href="#{anchors[case_id]}">{_e(case_id)}</a>' if case_id in anchors else _e(case_id)
        q = r["quality"]
        organs = ", ".join(k for k, o in (q.get("organs") or {}).items() if o.get("flag") == "review")
        lines.append(f"<tr><td>{name}</td><td>{_e(r.get('bundle', ''))}</td>"
                     f'<td class="num">{_number(q.get("score"), ".1f")}</td><td>{_e(organs)}</td>'
                     f"<td>{_e('; '.join(q.get('reasons') or []))}</td></tr>")
    parts.append('<table class="flagged"><tr><th>case</th><th>bundle</th><th>score</th><th>organs</th>'
                 f"<th>reasons</th></tr>{''.join(lines)}</table>")
    parts.append('<p class="muted">Score: the largest z-score of the quality signs (docs/QC.md); '
                 f"review above the threshold fitted on the validation split "
                 f"({_number(flagged[0]['quality'].get('threshold'), '.2f')}).</p></section>")
    return "".join(parts)


_OUTPUT_NAMES = {"segmentation": "segmentation (NIfTI)", "dicom_seg": "DICOM SEG"}


def _outputs_html(row: Mapping[str, Any]) -> str:
    outputs = {k: v for k, v in (row.get("outputs") or {}).items() if k != "figure" and v}
    if not outputs:
        return ""
    links = [f'<a href="{_href(v)}">{_e(_OUTPUT_NAMES.get(k, k))}</a>' for k, v in outputs.items()]
    return f"<p>Files: {' · '.join(links)}</p>"


def _timings_html(row: Mapping[str, Any]) -> str:
    timings = row.get("timings_s") or {}
    if not timings:
        return ""
    total = 0.0
    for v in timings.values():
        try:
            total += float(v) if math.isfinite(float(v)) else 0.0
        except (TypeError, ValueError):
            pass
    heads = "".join(f"<th>{_e(k)}</th>" for k in timings) + "<th>total</th>"
    cells = "".join(f'<td class="num">{_number(v, ".2f")}</td>' for v in timings.values())
    return (
        f'<table class="timings"><tr><th>seconds</th>{heads}</tr>'
        f'<tr><td></td>{cells}<td class="num">{total:.2f}</td></tr></table>'
    )


def _bundle_html(row: Mapping[str, Any]) -> str:
    task = str(row.get("task", ""))
    version = row.get("bundle_version")
    name = f"{_e(row.get('bundle', '?'))}{' ' + _e(version) if version else ''}"
    head = f"<h3>{name} <span class=\"muted\">({_e(task or 'unknown task')})</span></h3>"
    if task == "classification":
        body = _classification_html(row)
    elif task == "segmentation":
        body = _segmentation_html(row)
    else:
        body = ""
    weights = f'<p class="muted">weights {_short(row.get("weights_sha256"))}</p>' if row.get("weights_sha256") else ""
    return f'<div class="bundle">{head}{body}{_outputs_html(row)}{_timings_html(row)}{weights}</div>'


def _case_html(anchor: str, case_id: str, rows: list[Mapping[str, Any]], failed: list[Mapping[str, Any]]) -> str:
    first = rows[0]
    parts = [
        f'<section class="case" id="{anchor}">',
        f"<h2>{_e(case_id)}</h2>",
        f"<table><tr><th>source</th><td>{_e(first.get('source', 'n/a'))}</td></tr>"
        f"<tr><th>input sha256</th><td>{_short(first.get('input_sha256'))}</td></tr>"
        + (f'<tr><th>viewer</th><td><a href="{_e(first["viewer_url"])}">open the study in OHIF</a></td></tr>'
           if first.get("viewer_url") else "")
        + "</table>",
    ]
    if failed:
        stages = ", ".join(_e(f.get("stage", "?")) for f in failed)
        parts.append(f'<p class="error">Also failed at: {stages} (see <a href="#failures">failures</a>)</p>')
    parts.extend(_bundle_html(row) for row in rows)
    figure = next((r.get("outputs", {}).get("figure") for r in rows if (r.get("outputs") or {}).get("figure")), None)
    if figure:
        parts.append(
            f'<p><img class="figure" src="{_href(figure)}" alt="views of {_e(case_id)}" loading="lazy"></p>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def write_report(
    output_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    failures: Sequence[Mapping[str, Any]],
    *,
    title: str = "volumes inference report",
    summary: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``output_dir/report.html`` (atomically) for the results of one inference run.

    Args:
        output_dir: the run's output folder; figure and mask paths in ``rows`` are relative
            to it, and so are the report's links.
        rows: one dict per (case, bundle) result, as in ``predictions.jsonl``: ``case_id``,
            ``source``, ``input_sha256``, ``bundle``, ``bundle_version``, ``task``,
            ``weights_sha256``; classification rows ``probabilities`` (class -> 0..1),
            ``predicted``, ``top_slices``; segmentation rows ``organ_volumes_ml``;
            any row ``outputs`` (``segmentation``, ``dicom_seg``, ``figure``, ...) and
            ``timings_s`` (stage -> seconds). Missing keys are shown as "n/a" or left out.
        failures: ``{"case_id", "source", "stage", "error"}`` dicts.
        title: page title.
        summary: extra facts shown at the top (e.g. cases, failed, wall time, device).

    Cases appear in the order they first appear in ``rows``; all text from rows, failures
    and summary is HTML-escaped.

    Returns:
        the path of ``report.html``.
    """
    output_dir = Path(output_dir)
    cases: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        cases.setdefault(str(row.get("case_id", "")), []).append(row)
    anchors = {case_id: _anchor(i, case_id) for i, case_id in enumerate(cases)}
    failed_by_case: dict[str, list[Mapping[str, Any]]] = {}
    for failure in failures:
        failed_by_case.setdefault(str(failure.get("case_id", "")), []).append(failure)

    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p class=\"meta\">Generated {_e(generated)}</p>",
    ]
    if summary:
        parts.append(_key_value_table(summary, "summary"))
    parts.append("</header>")
    parts.append(_flagged_html(rows, anchors))

    toc = []
    for case_id, anchor in anchors.items():
        tasks = ", ".join(dict.fromkeys(str(r.get("task", "?")) for r in cases[case_id]))
        toc.append(f'<li><a href="#{anchor}">{_e(case_id)}</a> <span class="muted">({_e(tasks)})</span></li>')
    parts.append(f"<nav><h2>Cases ({len(cases)})</h2>")
    parts.append(f"<ol>{''.join(toc)}</ol>" if toc else '<p class="muted">No results.</p>')
    parts.append(f'<p><a href="#failures">Failures ({len(failures)})</a></p></nav>')

    parts.append(f'<section id="failures"><h2>Failures ({len(failures)})</h2>')
    if failures:
        lines = []
        for f in failures:
            case_id = str(f.get("case_id", ""))
            name = f'<a href="#{anchors[case_id]}">{_e(case_id)}</a>' if case_id in anchors else _e(case_id)
            lines.append(
                f"<tr><td>{name}</td><td>{_e(f.get('source', ''))}</td><td>{_e(f.get('stage', ''))}</td>"
                f'<td class="error">{_e(f.get("error", ""))}</td></tr>'
            )
        parts.append(
            '<table class="failures"><tr><th>case</th><th>source</th><th>stage</th><th>error</th></tr>'
            + "".join(lines)
            + "</table>"
        )
    else:
        parts.append("<p>No failures.</p>")
    parts.append("</section>")

    for case_id, case_rows in cases.items():
        parts.append(_case_html(anchors[case_id], case_id, case_rows, failed_by_case.get(case_id, [])))
    parts.append("</body></html>\n")

    text = "\n".join(parts)
    path = output_dir / "report.html"
    atomic_write_bytes(path, lambda stream: stream.write(text.encode("utf-8")))
    return path
