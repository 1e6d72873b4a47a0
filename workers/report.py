"""report.json (every metric) and report.html: one self-contained page, headline numbers first, charts as inline SVG.
Names come from users, so every string reaching the page goes through html.escape."""
import html
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
# Sections drawn in their own way; any other top-level entry gets a generic table.
DRAWN_SECTIONS = {"job", "summary", "dataset", "model", "per_class", "confusion_matrix", "curves", "budget",
                  "wall_seconds", "comparison", "classes"}
MAX_CONFUSION_CLASSES = 60
MAX_LISTED_ITEMS = 20
PERCENT_WORDS = ("accuracy", "recall", "precision", "sparsity")
COUNT_WORDS = ("runs", "rows", "support", "epochs", "steps")
ACCENT = "#2563eb"
# How a person names what a key holds, where the key itself reads badly.
LABELS = {"flops": "FLOPs", "onnx_bytes": "ONNX size", "safetensors_bytes": "Safetensors size", "latency_ms": "Latency",
          "torch_cpu_b1": "torch, batch 1", "onnxruntime_b1": "ONNX Runtime, batch 1",
          "onnxruntime_b64": "ONNX Runtime, batch 64", "mia_auc": "MIA AUC", "klom": "KLoM95 vs oracles",
          "klom_estimator": "KLoM estimator"}
# Columns that are scores, not costs: a ratio to the first row means nothing for them.
NOT_COSTS = ("accuracy", "recall", "auc", "agreement", "sparsity")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;
color:#1f2933}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:1.5rem;margin:0 0 4px}h2{font-size:1.1rem;margin:28px 0 10px}
.sub{color:#52606d;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:12px 16px;min-width:150px}
.card .label{font-size:.8rem;color:#52606d;text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:1.5rem;font-weight:600;margin-top:2px}
.card .note{font-size:.8rem;color:#52606d;margin-top:2px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{display:inline-block;margin:0;background:#fff;border:1px solid #e4e7eb;border-radius:8px;padding:8px}
table{border-collapse:collapse;background:#fff;font-size:.9rem}
th,td{border:1px solid #e4e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.confusion td{text-align:center;min-width:28px;font-variant-numeric:tabular-nums}
table.confusion td.diagonal{outline:2px solid #1f2933;outline-offset:-2px}
.muted{color:#7b8794}
svg text{font-family:inherit;fill:#323f4b}
"""


def write_report(out_dir: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.html into `out_dir`; returns their paths in that order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _plain(report)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    json_path.write_text(json.dumps(report, indent=2, default=str))
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


def render_html(report: dict) -> str:
    job = report.get("job") or {}
    title = " / ".join(str(job[key]) for key in ("method", "algorithm") if job.get(key)) or "job"
    parts = [
        f"<h1>Refinery report: {_text(title)}</h1>",
        f'<p class="sub">{_text(_job_line(job))}</p>',
        _headline(report),
        _comparison(report.get("comparison")),
        _curves(report.get("curves") or {}),
        _per_class_recall(report.get("per_class") or {}),
        _confusion(report.get("confusion_matrix"), _class_names(report)),
    ]
    for name in ("job", "dataset", "model", "budget"):
        if isinstance(report.get(name), dict):
            parts.append(_section(name, _key_value_table(report[name], name)))
    parts += [_section(name, _any_table(value, name)) for name, value in report.items()
              if name not in DRAWN_SECTIONS and isinstance(value, dict | list)]
    scalars = {name: value for name, value in report.items() if name not in DRAWN_SECTIONS and _is_scalar(value)}
    if scalars:
        parts.append(_section("other", _key_value_table(scalars)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_text('Refinery report: ' + title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


# ---- headline ---------------------------------------------------------------------------------------------------


def _headline(report: dict) -> str:
    summary = report.get("summary") or {}
    model = report.get("model") or {}
    cards = [_card(_label(key), _metric(key, value)) for key, value in summary.items() if _is_number(value)]
    if _is_number(model.get("params")):
        cards.append(_card("Params", _si(model["params"])))
    if _is_number(model.get("flops")):
        cards.append(_card("FLOPs", _si(model["flops"]), "per sample, forward"))
    sizes = model.get("size_bytes") or {}
    if _is_number(sizes.get("onnx")) or _is_number(sizes.get("safetensors")):
        main, other = ("onnx", "safetensors") if _is_number(sizes.get("onnx")) else ("safetensors", "onnx")
        note = f"{other}: {_bytes(sizes[other])}" if _is_number(sizes.get(other)) else ""
        cards.append(_card(f"Size ({main})", _bytes(sizes[main]), note))
    cards += _latency_cards(model.get("latency_ms") or {})
    cards += _budget_cards(report.get("budget") or {}, report.get("wall_seconds"))
    return f'<section class="cards">{"".join(cards)}</section>'


def _latency_cards(latency: dict) -> list[str]:
    for key in ("onnxruntime_b1", "torch_cpu_b1"):
        if _is_number(latency.get(key)):
            others = [f"{_label(name)}: {_ms(value)}" for name, value in latency.items()
                      if name not in (key, "runs") and _is_number(value)]
            runs = f"median of {latency['runs']} runs, 1 CPU thread" if _is_number(latency.get("runs")) else ""
            return [_card(f"Latency ({_label(key)})", _ms(latency[key]), "; ".join(filter(None, others + [runs])))]
    return []


def _budget_cards(budget: dict, wall_seconds) -> list[str]:
    cards = []
    if _is_number(budget.get("used_seconds")):
        of = f" of {_seconds(budget['max_seconds'])}" if _is_number(budget.get("max_seconds")) else ""
        note = f"stopped by: {budget['stopped_by']}" if budget.get("stopped_by") else ""
        cards.append(_card("Budget used", f"{_seconds(budget['used_seconds'])}{of}", note))
    if _is_number(wall_seconds):
        cards.append(_card("Wall time", _seconds(wall_seconds)))
    return cards


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{_text(note)}</div>' if note else ""
    return (f'<div class="card"><div class="label">{_text(label)}</div>'
            f'<div class="value">{_text(value)}</div>{note_html}</div>')


# ---- comparison -------------------------------------------------------------------------------------------------


def _comparison(rows) -> str:
    """Before/after or teacher/student rows; cost columns also show the ratio to the first row."""
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        return ""
    columns = _columns(rows)
    header = "".join(f"<th>{_text(_label(column))}</th>" for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = _metric(column, value) if value is not None else ""
            baseline = rows[0].get(column)
            is_cost = not any(word in column for word in NOT_COSTS)
            if row is not rows[0] and is_cost and _is_number(value) and _is_number(baseline) and baseline:
                text += f" (×{value / baseline:.2f})"
            cells.append(f'<td class="{"num" if _is_number(value) else ""}">{_text(text)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return _section("comparison", f"<table><tr>{header}</tr>{''.join(body)}</table>")


# ---- charts -----------------------------------------------------------------------------------------------------


def _curves(curves: dict) -> str:
    """Each curve is a list of [x, y] pairs over training steps/epochs, or {"x_label": …, "points": […]} when x is
    something else (FLOPs, sparsity on a pruning frontier)."""
    charts = [_line_chart(name, curve) if isinstance(curve, list) else
              _line_chart(name, curve.get("points") or [], str(curve.get("x_label") or "step"))
              for name, curve in curves.items() if isinstance(curve, list | dict)]
    charts = [chart for chart in charts if chart]
    if not charts:
        return ""
    return _section("training curves", f'<div class="charts">{"".join(charts)}</div>')


def _line_chart(name: str, points: list, x_label: str = "step") -> str:
    """One curve of [x, value] pairs: axes with ticks, x_label on x and the value on y."""
    pairs = [(float(p[0]), float(p[1])) for p in points
             if isinstance(p, list | tuple) and len(p) == 2 and _is_number(p[0]) and _is_number(p[1])]
    if not pairs:
        return ""
    width, height, left, right, top, bottom = 520, 260, 64, 18, 30, 46
    steps, values = [s for s, _ in pairs], [v for _, v in pairs]
    x_ticks = _ticks(min(steps), max(steps))
    y_ticks = _ticks(min(values), max(values))
    x_lo, x_hi = (min(steps), max(steps)) if max(steps) > min(steps) else (x_ticks[0], x_ticks[-1])
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def x(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (width - left - right)

    def y(value: float) -> float:
        return height - bottom - (value - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    grid = [f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e4e7eb"/>'
            f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="11">{_text(_tick(t))}</text>'
            for t in y_ticks]
    grid += [f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{height - bottom}" y2="{height - bottom + 4}" '
             f'stroke="#7b8794"/><text x="{x(t):.1f}" y="{height - bottom + 17}" text-anchor="middle" '
             f'font-size="11">{_text(_tick(t))}</text>' for t in x_ticks if x_lo <= t <= x_hi]
    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pairs)
    mark = (f'<polyline points="{line}" fill="none" stroke="{ACCENT}" stroke-width="2"/>' if len(pairs) > 1 else
            f'<circle cx="{x(steps[0]):.1f}" cy="{y(values[0]):.1f}" r="3" fill="{ACCENT}"/>')
    label = _label(name)
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{_text(label)}"><title>{_text(label)}</title>'
            f'<text x="{left}" y="18" font-size="13" font-weight="600">{_text(label)}</text>'
            f'<text x="{width - right}" y="18" font-size="11" text-anchor="end">last {_text(_tick(values[-1]))}'
            f' at {_text(x_label)} {_text(_tick(steps[-1]))}</text>{"".join(grid)}'
            f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#7b8794"/>'
            f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#7b8794"/>'
            f'{mark}<text x="{(left + width - right) / 2}" y="{height - 8}" text-anchor="middle" font-size="12">'
            f'{_text(x_label)}</text><text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" '
            f'text-anchor="middle" font-size="12">{_text(label)}</text></svg></figure>')


def _per_class_recall(per_class: dict) -> str:
    """Horizontal bars, one per class, recall from 0 to 1 (support in each bar's tooltip)."""
    recall = {str(k): float(v) for k, v in (per_class.get("recall") or {}).items() if _is_number(v)}
    if not recall:
        return ""
    support = per_class.get("support") or {}
    label_width, bar_width, row, top = 150, 380, 20, 24
    width, height = label_width + bar_width + 60, top + row * len(recall) + 10
    grid = "".join(f'<line x1="{label_width + t * bar_width}" x2="{label_width + t * bar_width}" y1="{top - 4}" '
                   f'y2="{height - 10}" stroke="#e4e7eb"/><text x="{label_width + t * bar_width}" y="{top - 8}" '
                   f'text-anchor="middle" font-size="11">{t:g}</text>' for t in (0, 0.25, 0.5, 0.75, 1))
    bars = []
    for index, (name, value) in enumerate(recall.items()):
        y = top + index * row
        count = f", support {support[name]}" if name in support else ""
        bars.append(f'<g><title>{_text(f"{name}: recall {value:.4f}{count}")}</title>'
                    f'<text x="{label_width - 8}" y="{y + 14}" text-anchor="end" font-size="12">'
                    f'{_text(_shorten(name, 22))}</text><rect x="{label_width}" y="{y + 3}" '
                    f'width="{max(value, 0.0) * bar_width:.1f}" height="{row - 6}" fill="{ACCENT}"/>'
                    f'<text x="{label_width + max(value, 0.0) * bar_width + 6:.1f}" y="{y + 14}" font-size="11">'
                    f'{value:.3f}</text></g>')
    svg = (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="per-class recall"><title>per-class recall</title>{grid}{"".join(bars)}</svg></figure>')
    return _section("per-class recall (validation)", svg)


def _confusion(matrix, names: list[str]) -> str:
    """A heat table: rows are true classes, columns predictions, shade = share of the row."""
    if not isinstance(matrix, list) or not matrix or not all(isinstance(r, list) for r in matrix):
        return ""
    if len(matrix) > MAX_CONFUSION_CLASSES:
        return _section("confusion matrix", f'<p class="muted">{len(matrix)} classes are too many to draw; '
                                            "the matrix is in report.json.</p>")
    names = names if len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
    header = "".join(f"<th>{_text(_shorten(name, 12))}</th>" for name in names)
    rows = []
    for true, (name, counts) in enumerate(zip(names, matrix, strict=True)):
        total = sum(c for c in counts if _is_number(c)) or 1
        cells = []
        for predicted, count in enumerate(counts):
            share = count / total if _is_number(count) else 0.0
            colour = f"background:rgba(37,99,235,{share:.3f});color:{'#fff' if share > 0.55 else '#1f2933'}"
            cells.append(f'<td class="{"diagonal" if predicted == true else ""}" style="{colour}" '
                         f'title="{_text(f"true {name}, predicted {names[predicted]}: {count}")}">{_text(count)}</td>')
        rows.append(f"<tr><th>{_text(_shorten(name, 12))}</th>{''.join(cells)}</tr>")
    table = (f'<table class="confusion"><tr><th class="muted">true \\ predicted</th>{header}</tr>'
             f"{''.join(rows)}</table>")
    return _section("confusion matrix (validation)", table)


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 12) for i in range(first, last + 1)]


# ---- tables -----------------------------------------------------------------------------------------------------


def _section(name: str, body: str) -> str:
    return f"<section><h2>{_text(_label(name))}</h2>{body}</section>" if body else ""


def _any_table(value, context: str) -> str:
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        columns = _columns(value)
        header = "".join(f"<th>{_text(_label(column))}</th>" for column in columns)
        rows = "".join("<tr>" + "".join(_value_cell(f"{context}.{column}", row.get(column)) for column in columns)
                       + "</tr>"
                       for row in value)
        return f"<table><tr>{header}</tr>{rows}</table>"
    if isinstance(value, dict):
        return _key_value_table(value, context)
    return f"<p>{_text(_listed(value))}</p>"


def _key_value_table(values: dict, context: str = "") -> str:
    """Two columns: dotted key, value; `context` (the section's name) helps choose units, e.g. per_layer_sparsity."""
    rows = "".join(f"<tr><th>{_text(key)}</th>{_value_cell(f'{context}.{key}', value)}</tr>"
                   for key, value in _flatten(values))
    return f"<table>{rows}</table>" if rows else ""


def _value_cell(key: str, value) -> str:
    if _is_number(value):
        return f'<td class="num">{_text(_metric(key, value))}</td>'
    if isinstance(value, list):
        return f"<td>{_text(_listed(value))}</td>"
    return f"<td>{_text('' if value is None else value)}</td>"


def _flatten(values: dict, prefix: str = "") -> Iterable[tuple[str, object]]:
    """Nested dicts become dotted keys (`latency_ms.torch_cpu_b1`), so every table stays two columns wide."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _columns(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [str(key) for key in row if str(key) not in columns]
    return columns


def _class_names(report: dict) -> list[str]:
    for source in (report, report.get("model") or {}, report.get("dataset") or {}):
        if isinstance(source.get("classes"), list):
            return [str(name) for name in source["classes"]]
    return [str(name) for name in ((report.get("per_class") or {}).get("recall") or {})]


def _job_line(job: dict) -> str:
    fields = [("job", job.get("id")), ("status", job.get("status")), ("created", job.get("created_at"))]
    return " · ".join(f"{name} {value}" for name, value in fields if value is not None)


# ---- formatting -------------------------------------------------------------------------------------------------


def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _label(key) -> str:
    if key in LABELS:
        return LABELS[key]
    text = str(key).replace("_", " ")
    return text[:1].upper() + text[1:]


def _metric(key: str, value) -> str:
    """A number as a person reads it. The unit comes from the innermost part of the dotted key that names one:
    `size_bytes.onnx` is bytes, `latency_ms.runs` a count, `per_layer_sparsity.conv1` a share."""
    if not _is_number(value):
        return _listed(value) if isinstance(value, list) else str(value)
    for part in reversed(str(key).lower().split(".")):
        if part in COUNT_WORDS:
            break
        if any(word in part for word in PERCENT_WORDS) and 0 <= value <= 1:
            return f"{value * 100:.2f}%"
        if part.endswith("bytes"):
            return _bytes(value)
        if part.endswith("_ms"):
            return _ms(value)
        if part.endswith("seconds"):
            return _seconds(value)
        if part in ("params", "flops"):
            return _si(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _si(value: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:g}"


def _tick(value: float) -> str:
    return _si(value).replace(".00 ", " ") if abs(value) >= 1e4 else f"{value:.4g}"


def _bytes(count: float) -> str:
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= factor:
            return f"{count / factor:.2f} {suffix}"
    return f"{int(count)} B"


def _ms(milliseconds: float) -> str:
    return f"{milliseconds:.3g} ms" if milliseconds < 100 else f"{milliseconds:.0f} ms"


def _seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"


def _listed(values: list) -> str:
    shown = ", ".join(json.dumps(v) if isinstance(v, dict | list) else str(v) for v in values[:MAX_LISTED_ITEMS])
    more = len(values) - MAX_LISTED_ITEMS
    return f"{shown}, … ({more} more)" if more > 0 else shown


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _plain(value):
    """JSON-ready: numpy scalars and arrays become Python values, paths strings, NaN and infinity null."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
