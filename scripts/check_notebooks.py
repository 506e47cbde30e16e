"""Fail unless every committed notebook is in its committed form: no outputs or execution counts (they belong
to the docs build), and nothing else that JupyterLab adds (scripts/nbstrip.py: the kernelspec it ran with, run
metadata, widget state). A notebook that is not in that form would show as modified in `git status` as soon
as the set-up's clean filter sees it."""
import pathlib
import sys

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from nbstrip import strip_text  # noqa: E402

bad, drift = [], []
for path in sorted(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks").glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            bad.append(f"{path} cell {i}")
    text = path.read_text(encoding="utf-8")
    if strip_text(text) != text:
        drift.append(str(path))
if bad or drift:
    sys.exit("notebooks must be committed in their stripped form: run `python3 scripts/nbstrip.py notebooks/*.ipynb`"
             + ("\n outputs or execution counts in:\n  " + "\n  ".join(bad) if bad else "")
             + ("\n metadata JupyterLab added (kernelspec, run metadata, widget state) in:\n  " + "\n  ".join(drift)
                if drift else ""))
print("notebooks clean: no outputs committed, every notebook in its stripped form")
