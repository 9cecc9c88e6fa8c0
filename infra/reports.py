"""Evaluation reports: CSV, markdown and a PNG plot (mAP vs bits) written to the store."""
from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from infra import layout
from infra.store import Store

COLUMNS = ("method", "bits", "map", "p_at_100", "bytes_per_item", "fit_s", "encode_us_per_item",
           "search_ms_per_query", "val_map")


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_csv_rows(text: str) -> list[dict[str, Any]]:
    """Inverse of `to_csv`, numbers typed back."""
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        rows.append({k: (v if k == "method" else (int(v) if k in ("bits", "bytes_per_item") else float(v)))
                     for k, v in r.items()})
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)
    return head + body


def to_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table for the terminal."""
    cells = [COLUMNS] + [tuple(_fmt(r.get(c)) for c in COLUMNS) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(c, widths)) for c in cells)


def plot_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """mAP vs bits, one line per method (float as a horizontal ceiling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = sorted({r["method"] for r in rows})
    for m in methods:
        pts = sorted((r["bits"], r["map"]) for r in rows if r["method"] == m)
        if m == "float":
            ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="float (exact)")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per item")
    ax.set_ylabel("mAP (query vs database)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_markdown(png: bytes, title: str, uri: str) -> str:
    """Markdown showing the plot itself (a base64 data URI: the Prefect UI cannot fetch file:// or
    s3:// links) and the stored copy's URI. Cost: 4/3 x the PNG's size (~30-60 KB) in the artifact."""
    import base64

    return (f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})\n\n"
            f"Stored copy: `{uri}`")


def write_report(store: Store, dataset: str, run_id: str, rows: Sequence[dict[str, Any]],
                 title: str) -> dict[str, str]:
    """Write report.csv, report.md and map_vs_bits.png under reports/<dataset>/<run_id>/."""
    prefix = layout.report_prefix(dataset, run_id)
    store.write_bytes(prefix + "report.csv", to_csv(rows).encode())
    store.write_bytes(prefix + "report.md", (f"# {title}\n\n" + to_markdown(rows)).encode())
    store.write_bytes(prefix + "map_vs_bits.png", plot_png(rows, title))
    return {k: store.uri_of(prefix + k) for k in ("report.csv", "report.md", "map_vs_bits.png")}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
