"""The one markdown-table writer (qedlib.tables): the report's sections, `qed plan` and the benchmarks use it."""
from qedlib.tables import markdown_table


def test_markdown_table_cells():
    out = markdown_table(["name", "value", "note"], [["a", 1234.5678, None], ["b|c", float("nan"), 7]])
    assert out.splitlines() == ["| name | value | note |", "|---|---|---|", "| a | 1,234.57 | - |", "| b/c | - | 7 |"]


def test_markdown_table_float_format():
    assert markdown_table(["x"], [[12.5], [30.0], [0.012345]], ".3g").splitlines()[2:] == ["| 12.5 |", "| 30 |", "| 0.0123 |"]
