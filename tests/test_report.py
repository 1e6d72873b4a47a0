"""report.json and report.html: headline numbers first, inline SVG charts, nothing fetched, user names escaped."""
import json
import math
from html.parser import HTMLParser

import numpy as np

from workers.report import write_report

CLASSES = ["zero", "one", "two", "<script>alert(1)</script>"]


def realistic_report() -> dict:
    """A train job on four classes, as a worker would fill it in (numpy numbers included)."""
    confusion = np.array([[48, 1, 1, 0], [0, 50, 0, 0], [2, 0, 45, 3], [0, 1, 2, 47]])
    recall = confusion.diagonal() / confusion.sum(1)
    return {
        "job": {"id": "job_7f3a", "method": "prune", "algorithm": "structured", "status": "succeeded",
                "created_at": "2025-01-05T10:00:00Z"},
        "summary": {"accuracy": np.float64(0.95), "sparsity": 0.5},
        "dataset": {"uri": "builtin://digits", "rows": 1797, "validation_rows": 200, "classes": CLASSES},
        "model": {"arch": "cnn", "params": 16890, "flops": 940544,
                  "size_bytes": {"safetensors": 71960, "onnx": 70712},
                  "latency_ms": {"torch_cpu_b1": 0.127, "onnxruntime_b1": 0.0105, "onnxruntime_b64": 0.249,
                                 "runs": 100}},
        "per_class": {"recall": {name: float(r) for name, r in zip(CLASSES, recall, strict=True)},
                      "support": {name: int(s) for name, s in zip(CLASSES, confusion.sum(1), strict=True)}},
        "confusion_matrix": confusion,
        "curves": {"train_loss": [[step, 2.3 * math.exp(-step / 120) + 0.05] for step in range(0, 600, 24)],
                   "val_accuracy": [[step, 1 - 0.9 * math.exp(-step / 100)] for step in range(0, 600, 120)]},
        "budget": {"max_seconds": 900, "used_seconds": 41.23, "stopped_by": "epochs"},
        "wall_seconds": 44.8,
        "comparison": [
            {"name": "before", "accuracy": 0.97, "params": 65514, "flops": 3_761_152, "onnx_bytes": 264214,
             "latency_ms": 0.21},
            {"name": "after", "accuracy": 0.95, "params": 16890, "flops": 940544, "onnx_bytes": 70712,
             "latency_ms": 0.11},
        ],
        "per_layer_sparsity": {"body.features.0": 0.5, "body.features.3": 0.5},
        "notes": "pruned <b>in one shot</b>",
        "bad_value": float("nan"),
    }


class PageReader(HTMLParser):
    """Collects tags, attributes and the visible text of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [(tag, name, value) for name, value in attrs]

    def handle_data(self, data):
        self.text.append(data)


def read_page(tmp_path) -> tuple[PageReader, str]:
    json_path, html_path = write_report(tmp_path, realistic_report())
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    page = html_path.read_text()
    reader = PageReader()
    reader.feed(page)
    return reader, page


def test_report_json_holds_every_metric_as_plain_json(tmp_path):
    json_path, _ = write_report(tmp_path, realistic_report())
    report = json.loads(json_path.read_text())
    assert report["summary"]["accuracy"] == 0.95
    assert report["confusion_matrix"][2] == [2, 0, 45, 3]
    assert report["bad_value"] is None
    assert report["per_class"]["recall"]["<script>alert(1)</script>"] == 0.94


def test_page_draws_the_charts_as_inline_svg(tmp_path):
    reader, _ = read_page(tmp_path)
    svg_labels = [value for tag, name, value in reader.attributes if tag == "svg" and name == "aria-label"]
    assert svg_labels == ["Train loss", "Val accuracy", "per-class recall"]
    assert reader.tags.count("polyline") == 2
    assert reader.tags.count("rect") == len(CLASSES)
    assert any(name == "class" and value == "confusion" for tag, name, value in reader.attributes if tag == "table")


def test_headline_numbers_come_first(tmp_path):
    reader, _ = read_page(tmp_path)
    text = " ".join(reader.text)
    headline = ["95.00%", "50.00%", "16.89 k", "940.54 k", "69.05 KiB", "0.0105 ms", "41.2 s of 15 min",
                "stopped by: epochs", "44.8 s"]
    for number in headline:
        assert number in text
    assert text.index("41.2 s of 15 min") < text.index("Training curves")
    assert "(×0.26)" in text  # params after / before in the comparison table


def test_page_fetches_nothing(tmp_path):
    reader, page = read_page(tmp_path)
    linked = [value or "" for _, name, value in reader.attributes if name in ("src", "href")]
    assert not [value for value in linked if value.startswith(("http://", "https://", "//"))]
    assert "script" not in reader.tags and "link" not in reader.tags
    assert "@import" not in page and "url(" not in page


def test_user_strings_are_escaped(tmp_path):
    reader, page = read_page(tmp_path)
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" in " ".join(reader.text)
    assert "b" not in reader.tags
