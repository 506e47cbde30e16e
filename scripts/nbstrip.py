"""Notebooks as git should see them: what opening or running one in JupyterLab adds never reaches git.

JupyterLab writes the outputs, execution counts, widget state and the kernel it ran with into the file
(autosave does it without asking), so a student who only ran the course would see every notebook as
modified. As a git *clean filter* this script hands git the notebook without any of that, so `git status`
and `git diff` show only edits to cells; the file on disk keeps its outputs.

    git config filter.nbstrip.clean "python3 scripts/nbstrip.py"   # scripts/setup.sh does this,
    # with `*.ipynb filter=nbstrip` in .gitattributes

A filter alone leaves `git status` listing a notebook whose size changed (git trusts a size change without
looking at the content; `git diff` is empty, `git add` clears it). So the set-up also gives the project's
Jupyter a *pre-save hook* (`pre_save_hook_for`, in ``.venv/etc/jupyter/jupyter_server_config.py``): notebooks
inside the repository's ``notebooks/`` are saved in their committed form, so the file on disk equals what git
has and `git status` stays clean. Outputs then live in the browser until the notebook is closed; to keep them,
work on a copy outside ``notebooks/`` (the README says how).

What is removed or reset (the committed form, which scripts/check_notebooks.py enforces):
- code cells: outputs (emptied) and execution counts (null);
- cell metadata other than ``tags`` (JupyterLab's ``execution``, ``scrolled``, ``collapsed``, ``jupyter``, ...);
- notebook metadata: only ``kernelspec`` and ``language_info`` are kept, set to `KERNELSPEC` and
  `LANGUAGE_INFO` (ipykernel's own kernelspec, so opening a notebook does not change it; the Python
  version JupyterLab records is dropped); ``widgets`` and anything else goes;
- cell sources are written as lists of lines, the file as nbformat writes it (one-space indent, sorted
  keys, a final newline).

Usage: ``python3 scripts/nbstrip.py < in.ipynb > out.ipynb`` (the filter; input that is not a notebook,
e.g. a file with merge-conflict markers, passes through unchanged), ``python3 scripts/nbstrip.py FILE ...``
(rewrite in place), ``python3 scripts/nbstrip.py --check FILE ...`` (list the files that are not in the
committed form; exit status 1 if any). Standard library only: git runs it with whatever python3 is first
on PATH, with or without the project's virtual environment.
"""
from __future__ import annotations

import json
import os
import sys

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}
CELL_METADATA_KEPT = ("tags",)


def _lines(source) -> list[str]:
    return source.splitlines(keepends=True) if isinstance(source, str) else list(source)


def strip_notebook(nb: dict) -> dict:
    """The committed form of a notebook (a new dict; see the module docstring)."""
    cells = []
    for cell in nb.get("cells", []):
        cell = dict(cell)
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in CELL_METADATA_KEPT}
        cell["source"] = _lines(cell.get("source", []))
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    out = dict(nb, cells=cells)
    out["metadata"] = {"kernelspec": dict(KERNELSPEC), "language_info": dict(LANGUAGE_INFO)}
    return out


def strip_text(text: str) -> str:
    """A notebook file's text in its committed form; text that is not a notebook comes back unchanged."""
    try:
        nb = json.loads(text)
    except ValueError:
        return text
    if not isinstance(nb, dict) or "cells" not in nb:
        return text
    return json.dumps(strip_notebook(nb), indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def pre_save_hook_for(directory):
    """A Jupyter ContentsManager pre-save hook: a notebook saved inside ``directory`` is written in its committed
    form (`strip_notebook`); every other file is saved as it is. Configure it as
    ``c.ContentsManager.pre_save_hook = pre_save_hook_for("/path/to/repo/notebooks")``."""
    root = os.path.realpath(directory)

    def hook(model, path, contents_manager, **kwargs):
        if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
            return
        os_path = os.path.realpath(os.path.join(contents_manager.root_dir, path.strip("/")))
        if os.path.commonpath([os_path, root]) == root:
            model["content"] = strip_notebook(model["content"])

    return hook


def main(argv: list[str]) -> int:
    if not argv:  # the filter: stdin -> stdout, bytes as UTF-8
        sys.stdout.buffer.write(strip_text(sys.stdin.buffer.read().decode("utf-8")).encode("utf-8"))
        return 0
    check = argv[0] == "--check"
    paths = argv[1:] if check else argv
    unclean = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        clean = strip_text(text)
        if clean != text:
            unclean.append(path)
            if not check:  # atomically: a notebook is never left half written
                tmp = f"{path}.nbstrip-tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(clean)
                os.replace(tmp, path)
    if check and unclean:
        print("not in the committed form (run `python3 scripts/nbstrip.py " + " ".join(unclean) + "`):\n  "
              + "\n  ".join(unclean), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
