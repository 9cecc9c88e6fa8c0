"""infra/reports.py: the plot travels inside the artifact's markdown, not as a link the UI cannot open."""
from __future__ import annotations

import base64
import re

from infra.reports import plot_markdown


def test_plot_markdown_embeds_the_png_itself():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    md = plot_markdown(png, "mAP vs bits", "s3://bucket/reports/x/map_vs_bits.png")
    m = re.match(r"!\[mAP vs bits\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert m and base64.b64decode(m.group(1)) == png
    assert "s3://bucket/reports/x/map_vs_bits.png" in md
