"""Markdown tables: the one writer behind the run report's sections, `qed plan` and every benchmark's table."""
from __future__ import annotations

import math


def markdown_table(headers: list[str], rows: list[list], float_format: str = ",.2f") -> str:
    """A markdown table; None and NaN cells show as "-", floats with `float_format`, a "|" in a cell as "/"."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return (format(v, float_format) if isinstance(v, float) else str(v)).replace("|", "/")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])
