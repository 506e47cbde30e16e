"""Fail if a committed notebook carries outputs or execution counts (they belong to the docs build)."""
import pathlib
import sys

import nbformat

bad = []
for path in sorted(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks").glob("*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count")):
            bad.append(f"{path} cell {i}")
if bad:
    sys.exit("notebooks must be committed without outputs (run `jupyter nbconvert --clear-output --inplace "
             "notebooks/*.ipynb`):\n  " + "\n  ".join(bad))
print(f"notebooks clean: no outputs committed")
