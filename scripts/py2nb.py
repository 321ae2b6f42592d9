"""Build a notebook from a py-percent file (authoring aid): `python scripts/py2nb.py src.py notebooks/NN_x.ipynb`.

Cells start with `# %%` (code), `# %% [markdown]` (markdown, lines prefixed with `# `), or
`# %% tags=["parameters"]` (the papermill parameters cell). Output has no outputs or counts.
"""
import json
import re
import sys


def convert(text: str) -> dict:
    cells, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^# %%(.*)$", line)
        if m:
            if cur:
                cells.append(cur)
            head = m.group(1).strip()
            kind = "markdown" if head.startswith("[markdown]") else "code"
            tags = re.findall(r'"([^"]+)"', head) if "tags" in head else []
            cur = {"cell_type": kind, "metadata": {"tags": tags} if tags else {}, "source": []}
            continue
        if cur is None:
            continue
        if cur["cell_type"] == "markdown":
            line = line[2:] if line.startswith("# ") else ("" if line == "#" else line)
        cur["source"].append(line)
    if cur:
        cells.append(cur)
    out = []
    for c in cells:
        while c["source"] and not c["source"][-1].strip():
            c["source"].pop()
        c["source"] = [s + "\n" for s in c["source"][:-1]] + c["source"][-1:]
        if c["cell_type"] == "code":
            c.update(outputs=[], execution_count=None)
        out.append(c)
    return {"cells": out, "metadata": {"kernelspec": {"name": "qed", "display_name": "QED Workbook (qed)", "language": "python"},
                                       "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


if __name__ == "__main__":
    nb = convert(open(sys.argv[1]).read())
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"cell-{i}"
    with open(sys.argv[2], "w") as f:
        json.dump(nb, f, indent=1)
        f.write("\n")
