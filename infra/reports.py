"""Evaluation reports: CSV, markdown and a PNG plot (mAP vs bits) written to the store."""
from __future__ import annotations

import csv
import io
from typing import Any, Sequence

from infra import layout
from infra.store import Store

COLUMNS = ("method", "bits", "map", "map_std", "n_seeds", "p_at_100", "map_at_1000", "map_at_1000_lit",
           "map_at_5000_lit", "ann_recall_at_10", "bytes_per_item", "fit_s", "encode_us_per_item",
           "search_ms_per_query", "val_map", "note")
TEXT, INTS = ("method", "note"), ("bits", "bytes_per_item", "n_seeds")
# What each column means, printed under every markdown table (the protocol is named, not implied).
LEGEND = ("map: mAP@all (normaliser: all relevant items), mean over n_seeds seeds, map_std their sample std; "
          "map_at_1000: AP@1000 normalised by min(1000, relevant); map_at_R_lit: AP@R normalised by the relevant "
          "items retrieved in the top R (the hashing papers' evaluation code); ann_recall_at_10: top-10 by the "
          "code vs exact top-10 in the float space it quantises (100 queries); val_map: val queries vs the "
          "train gallery (what selection sees). A difference is a win only when it exceeds both rows' std.")


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
        rows.append({k: (v if k in TEXT else (int(v) if k in INTS else float(v or "nan")))
                     for k, v in r.items()})
    return rows


def to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |\n" for r in rows)
    return head + body + "\n" + LEGEND + "\n"


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
    for i, m in enumerate(methods):
        pts = sorted((r["bits"], r["map"], r.get("map_std") or 0.0) for r in rows
                     if r["method"] == m and r["map"] == r["map"])  # nan: a method that did not run
        if not pts:
            continue
        if pts[0][0] >= 512:  # float ceilings (raw, cosine, a learned embedding): horizontal lines
            ax.axhline(pts[0][1], ls="--", lw=1, label=f"{m} (exact float)",
                       color="k" if m == "float" else plt.get_cmap("tab20")(i % 20))
        else:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=m, color=plt.get_cmap("tab20")(i % 20))
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
    if isinstance(v, float) and v != v:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
