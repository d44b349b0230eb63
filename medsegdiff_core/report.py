"""The HTML report of a ``predict`` or ``evaluate`` run: ``report.html`` beside the outputs.

One self-contained file that opens from disk in any browser, with no server and no network:
thumbnails are embedded as ``data:`` URIs, CSS and the table-sorting script are inline. It shows

* a table with one row per case: per class Dice, IoU and HD95 and the uncertainty figures, the
  records of ``metrics.json`` as they are (nothing is recomputed here); sorted by mean Dice,
  worst first, and sortable by any column with a click on its header;
* per case the image with the predicted outlines, with the ground truth's where there is a mask,
  and the uncertainty map in the colour map of the uncertainty PNGs, with their legends (for a
  volume: the slice with the most predicted foreground);
* the release's model card, or the checkpoint the model came from;
* beside it, when the release holds one, its training-history plot (``training-history.png``:
  train loss, validation Dice and DP epsilon per round and site, :mod:`.plots`), embedded.

:func:`case_figure` turns one case's arrays into thumbnails as the run goes (a few tens of KB
per case are kept, not the images); :func:`write_report` writes the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.writers import (
    UNCERTAINTY_COLOUR_MAP,
    _as_rgb_uint8,
    _blend,
    _colour_lut,
    _contours,
    label_colour,
    label_names,
    resize_label_map,
    uncertainty_rgb,
    uncertainty_scale,
)

THUMBNAIL_SIDE = 200
"""Longest side of a case's thumbnails in pixels: a few hundred cases stay a few MB."""

_FIGURES = ("prediction", "truth", "uncertainty")
_UNCERTAINTY_KEYS = (("uncertainty_score", "unc. score"), ("pixel_auroc", "AUROC"), ("ece", "ECE"))


@dataclass(frozen=True)
class CaseFigure:
    """A case's thumbnails as data URIs (``truth`` None without a mask) and what they show."""

    case: str
    prediction: str
    truth: str | None
    uncertainty: str
    note: str = ""


def _data_uri(picture: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    options = {"quality": 88} if fmt == "JPEG" else {"optimize": True}
    Image.fromarray(picture).save(buffer, format=fmt, **options)
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _thumbnail_size(shape: tuple[int, ...]) -> tuple[int, int]:
    height, width = shape[:2]
    scale = THUMBNAIL_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _shrink_max(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) floats -> ``size`` keeping each block's largest value (a thin uncertain rim stays
    visible at 1/40 of the size); nearest neighbour where it grows. Row band by row band."""
    values = np.asarray(values)
    (height, width), (h, w) = values.shape, size
    if h >= height and w >= width:
        return resize_label_map(values, size).astype(np.float32)
    out = np.empty(size, np.float32)
    rows = np.linspace(0, height, h + 1).astype(np.intp)
    cols = np.linspace(0, width, w + 1).astype(np.intp)
    for i in range(h):
        band = np.nan_to_num(values[rows[i] : max(rows[i + 1], rows[i] + 1)], nan=np.inf)
        out[i] = np.maximum.reduceat(band.max(axis=0), cols[:-1])
    return out


def case_figure(
    case: str,
    image: np.ndarray,
    labels: np.ndarray,
    uncertainty: np.ndarray,
    target: np.ndarray | None = None,
    *,
    kind: str = "entropy",
    note: str = "",
) -> CaseFigure:
    """Thumbnails of one case at :data:`THUMBNAIL_SIDE`: the image with the predicted labels
    (light tint, solid outlines), with the ground truth's, and the uncertainty map.

    Args:
        case: Case name.
        image: As :func:`~.data.writers.write_overlay` takes it (uint8 (H, W, 3) or (H, W),
            or floats (C, H, W) in [0, 1]).
        labels: (H, W) predicted label map; ``target`` the mask's, or None.
        uncertainty: (H, W) uncertainty of ``kind`` (``"entropy"`` or ``"variance"``).
        note: What the thumbnails show, if not the whole image (e.g. the slice of a volume).
    """
    rgb = _as_rgb_uint8(image)
    size = _thumbnail_size(rgb.shape)
    step = max(1, min(rgb.shape[:2]) // (4 * max(size)))  # a big photo is thinned first
    small = Image.fromarray(np.ascontiguousarray(rgb[::step, ::step]))
    small_rgb = np.asarray(small.resize(size[::-1], Image.Resampling.LANCZOS))
    colours = np.zeros((256, 3), np.float32)
    for value in range(1, 256):
        colours[value] = label_colour(value)

    def outlined(label_map: np.ndarray) -> str:
        shrunk = resize_label_map(np.asarray(label_map), size).astype(np.intp)
        picture = _blend(small_rgb, shrunk, _contours(shrunk), colours, 0.25)
        return _data_uri(picture, "JPEG")

    return CaseFigure(
        case,
        outlined(labels),
        None if target is None else outlined(target),
        _data_uri(uncertainty_rgb(_shrink_max(uncertainty, size), kind), "PNG"),
        note,
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f1f1f1;cursor:pointer;user-select:none;white-space:nowrap}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td:first-child,th:first-child{text-align:left;white-space:nowrap}
.wrap{overflow-x:auto}.muted{color:#666}
.key{display:flex;gap:1.2em;align-items:center;flex-wrap:wrap;margin:.6em 0}
.swatch{display:inline-block;width:1em;height:1em;border:1px solid #333;vertical-align:-2px}
.bar{display:inline-block;width:12em;height:1em;border:1px solid #333;vertical-align:-2px}
.cases{display:flex;flex-wrap:wrap;gap:1em}
.case{border:1px solid #ddd;padding:.5em;border-radius:4px}
.case h3{font-size:1em;margin:.1em 0 .4em}.case figure{display:inline-block;margin:0 .3em 0 0}
.case figcaption{font-size:.85em;color:#555;text-align:center}
.case img{display:block;image-rendering:auto;border:1px solid #eee}
.model{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.model>div{flex:1 1 28em;min-width:0}.history img{max-width:100%;height:auto}
.card dt{font-weight:600}.card dd{margin:0 0 .4em 1.2em;font-family:monospace;white-space:pre-wrap}
"""

_SCRIPT = """
function sortTable(th){
  const table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
  const dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
  for(const other of table.tHead.rows[0].cells)other.removeAttribute('aria-sort');
  th.setAttribute('aria-sort',dir);
  const sign=dir==='ascending'?1:-1,text=th.dataset.type==='text';
  const key=r=>{const v=r.cells[col].dataset.value;return text?v:(v===''?null:parseFloat(v));};
  const rows=[...body.rows].sort((a,b)=>{
    const x=key(a),y=key(b);
    if(x===null||y===null)return (x===null)-(y===null);  // no value: last either way
    return text?sign*x.localeCompare(y):sign*(x-y);});
  for(const r of rows)body.appendChild(r);
}
window.addEventListener('load',()=>{
  const images=[...document.images];
  for(const img of images)if(img.complete&&img.naturalWidth>0)img.dataset.loaded='1';
  const loaded=images.filter(i=>i.dataset.loaded).length;
  document.body.dataset.images=loaded+'/'+images.length;
});
"""


def _number(value: float | None, digits: int = 3) -> tuple[str, str]:
    """(data-value, shown text) of a figure; None is shown as an n/a and sorts last."""
    if value is None or not math.isfinite(value):
        return "", "n/a"
    return repr(float(value)), f"{value:.{digits}f}"


def _mean_dice(row: Mapping[str, Any]) -> float | None:
    values = [c["dice"] for c in row["per_class"].values() if c.get("dice") is not None]
    return sum(values) / len(values) if values else None


def _table(
    cases: Sequence[str], rows: Sequence[Mapping[str, Any]], classes: Sequence[str], unit: str
) -> str:
    by_case = {row["case"]: row for row in rows}
    head = ['<th data-type="text">case</th>']
    if rows:
        head.append('<th aria-sort="ascending">mean Dice</th>')
        for name in classes:
            head += [f"<th>{html.escape(name)} {k}</th>" for k in ("Dice", "IoU", f"HD95 {unit}")]
        for name in classes:
            head += [f"<th>{html.escape(name)} {label}</th>" for _, label in _UNCERTAINTY_KEYS]
    lines = []
    for case in cases:
        row = by_case.get(case)
        cells = [(case, f'<a href="#case-{html.escape(case)}">{html.escape(case)}</a>')]
        if row is not None:
            cells.append(_number(_mean_dice(row)))
            for name in classes:
                metrics = row["per_class"][name]
                cells += [_number(metrics["dice"]), _number(metrics["iou"])]
                cells.append(_number(metrics["hd95"], 2))
            for name in classes:
                figures = (row.get("uncertainty") or {}).get(name, {})
                cells += [_number(figures.get(key)) for key, _ in _UNCERTAINTY_KEYS]
        tds = "".join(f'<td data-value="{html.escape(v)}">{shown}</td>' for v, shown in cells)
        lines.append(f"<tr>{tds}</tr>")
    heads = "".join(h.replace("<th", '<th onclick="sortTable(this)"', 1) for h in head)
    return (
        f'<div class="wrap"><table id="cases"><thead><tr>{heads}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table></div>"
    )


def _key(classes: Mapping[str, Sequence[int]], kind: str) -> str:
    swatches = "".join(
        f'<span><span class="swatch" style="background:rgb{label_colour(v)}"></span> '
        f"{html.escape(name)}</span>"
        for v, name in label_names(classes).items()
    )
    lut = _colour_lut()
    stops = ",".join(f"rgb{tuple(int(c) for c in lut[i])}" for i in range(0, 256, 32))
    scale = uncertainty_scale(kind)
    top = f"{scale.top:g} {scale.unit}".strip()
    bar = (
        f'<span>uncertainty ({UNCERTAINTY_COLOUR_MAP}): 0 <span class="bar" style="background:'
        f'linear-gradient(to right,{stops},rgb{tuple(int(c) for c in lut[-1])})"></span> {top}'
        "</span>"
    )
    notes = "".join(f"<div class='muted'>{html.escape(line)}</div>" for line in scale.caption)
    return f'<div class="key">{swatches}{bar}</div>{notes}'


def _figures(figures: Sequence[CaseFigure], order: Sequence[str]) -> str:
    by_case = {figure.case: figure for figure in figures}
    cards = []
    for case in order:
        figure = by_case.get(case)
        if figure is None:
            continue
        parts = []
        for name in _FIGURES:
            uri = getattr(figure, name)
            if uri is not None:
                caption = {"truth": "ground truth"}.get(name, name)
                parts.append(
                    f'<figure><img src="{uri}" alt="{caption} of {html.escape(case)}">'
                    f"<figcaption>{caption}</figcaption></figure>"
                )
        note = f'<div class="muted">{html.escape(figure.note)}</div>' if figure.note else ""
        cards.append(
            f'<div class="case" id="case-{html.escape(case)}"><h3>{html.escape(case)}</h3>'
            f"{''.join(parts)}{note}</div>"
        )
    return f'<div class="cases">{"".join(cards)}</div>'


def _model_card(card: Mapping[str, Any] | None, model: str) -> str:
    if not card:
        return (
            f"<p>The model is the checkpoint <code>{html.escape(model)}</code>, not a signed "
            "release: it has no model card.</p>"
        )
    title = f"{card.get('name', '?')} v{card.get('version', '?')}"
    parts = [
        f"<h3>{html.escape(title)}</h3>",
        f"<p>{html.escape(str(card.get('summary', '')))}</p>",
    ]
    for section, values in card.items():
        if section in {"name", "version", "summary"}:
            continue
        items = values.items() if isinstance(values, dict) else [("", values)]
        entries = "".join(
            (f"<dt>{html.escape(str(key))}</dt>" if key else "")
            + f"<dd>{html.escape(value if isinstance(value, str) else json.dumps(value))}</dd>"
            for key, value in items
        )
        parts.append(
            f"<h4>{html.escape(section.replace('_', ' ').capitalize())}</h4><dl>{entries}</dl>"
        )
    return f'<div class="card">{"".join(parts)}</div>'


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _training_history(png: bytes | None) -> str:
    """The "Training history" section: the release's plot, embedded; "" without one."""
    if not png:
        return ""
    if not png.startswith(_PNG_SIGNATURE):
        body = '<p class="muted">The release\'s training-history.png is not a PNG image.</p>'
    else:
        uri = f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}"
        body = (
            f'<img id="training-history" src="{uri}" alt="training history: train loss, '
            'validation Dice and DP epsilon per round and site">'
            '<p class="muted">Per round of the federated run: train loss and validation Dice '
            "of each site and the global (weighted) value; with DP, the epsilon each site "
            "had spent.</p>"
        )
    return f'<div class="history"><h3>Training history</h3>{body}</div>'


def write_report(
    path: Path,
    *,
    cases: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any] | None,
    figures: Sequence[CaseFigure],
    classes: Mapping[str, Sequence[int]],
    model: str,
    model_card: Mapping[str, Any] | None = None,
    training_history: bytes | None = None,
    uncertainty_kind: str = "entropy",
    hd95_unit: str = "px",
) -> Path:
    """Write the report page; returns ``path``.

    Args:
        path: The HTML file (the caller guards where it may be written).
        cases: Every case of the run, in input order.
        rows, summary: ``metrics.json``'s ``cases`` and ``summary`` (no metrics: ``[]``, None).
        figures: The cases' :func:`case_figure` thumbnails.
        classes: Class name -> label values (the outlines' legend).
        model: What the model was loaded from (shown without a model card).
        model_card: The release's model card (``model-card.json``), None for a checkpoint.
        training_history: The release's ``training-history.png`` bytes, None without one.
        uncertainty_kind: What the uncertainty maps hold.
        hd95_unit: ``"px"`` (2-D) or ``"mm"`` (volumes).
    """
    worst_first = sorted(rows, key=lambda r: (_mean_dice(r) is None, _mean_dice(r) or 0.0))
    order = [row["case"] for row in worst_first]
    order += [case for case in cases if case not in set(order)]
    names = list(classes)
    if summary is not None:
        means = ", ".join(
            f"{name} {_number(summary['per_class'][name]['dice'])[1]}" for name in names
        )
        headline = f"<p>{len(rows)} cases scored; mean Dice: {html.escape(means)}.</p>"
    else:
        headline = f"<p>{len(cases)} cases segmented; no masks, so no metrics.</p>"
    title = "FedMedSegDiff " + ("evaluation" if summary is not None else "predictions")
    body = [
        f"<h1>{title}</h1>",
        headline,
        '<p class="muted">Click a column header to sort by it; rows start worst mean Dice first. '
        "n/a: undefined (e.g. HD95 with an empty mask).</p>",
        _table(order, worst_first, names, hd95_unit),
        "<h2>Cases</h2>",
        _key(classes, uncertainty_kind),
        _figures(figures, order),
        "<h2>Model</h2>",
        f'<div class="model"><div>{_model_card(model_card, model)}</div>'
        f"{_training_history(training_history)}</div>",
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
