"""scripts/nbstrip.py, the notebooks' git clean filter: running a notebook leaves `git status` clean."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from nbstrip import KERNELSPEC, strip_text  # noqa: E402


def test_every_committed_notebook_is_already_in_its_stripped_form():
    # otherwise a fresh clone with the filter installed would show it as modified
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    drift = [p.name for p in notebooks if strip_text(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]
    assert not drift, drift
    assert all(json.loads(p.read_text())["metadata"]["kernelspec"] == KERNELSPEC for p in notebooks)


def test_text_that_is_not_a_notebook_passes_through_unchanged():
    conflicted = '{\n<<<<<<< HEAD\n "cells": []\n=======\n>>>>>>> other\n}\n'
    assert strip_text(conflicted) == conflicted
    assert strip_text('{"a": 1}') == '{"a": 1}'


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _course_repo(tmp_path):
    """A repository laid out like hvlab's, with the filter configured as scripts/setup.sh does, and one
    committed notebook; returns (repo, the notebook, nbformat)."""
    nbformat = pytest.importorskip("nbformat")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for name in (".gitattributes", ".gitignore"):  # the filter, and the ignored .ipynb_checkpoints/ and my-notebooks/
        shutil.copy(ROOT / name, repo / name)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A notebook"),
                nbformat.v4.new_code_cell("SCALE = 2", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(SCALE * 21)")]
    for i, cell in enumerate(nb.cells):
        cell.id = f"c{i}"
    path = repo / "notebooks" / "01_a.ipynb"
    path.write_text(strip_text(nbformat.writes(nb)), encoding="utf-8")  # committed in the stripped form
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "student@example.com")
    _git(repo, "config", "user.name", "student")
    _git(repo, "config", "filter.nbstrip.clean", f"{sys.executable} {ROOT / 'scripts' / 'nbstrip.py'}")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "course")
    return repo, path, nbformat


def _as_jupyterlab_leaves_it(nbformat, path):
    """Run the notebook on a real kernel (nbclient writes outputs, execution counts and the kernel's
    language_info, as JupyterLab does) and add what JupyterLab adds besides."""
    nbclient = pytest.importorskip("nbclient")
    ran = nbclient.NotebookClient(nbformat.read(path, as_version=4), timeout=120, kernel_name="python3").execute()
    assert ran.cells[2].outputs[0]["text"] == "42\n" and ran.cells[2].execution_count == 2
    ran.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    ran.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2}}
    ran.cells[2].metadata.update(scrolled=True, execution={"iopub.status.busy": "2026-11-26T10:00:00Z"})
    return ran


def test_the_filter_keeps_outputs_out_of_commits_and_diffs(tmp_path):
    repo, path, nbformat = _course_repo(tmp_path)
    ran = _as_jupyterlab_leaves_it(nbformat, path)
    nbformat.write(ran, path)  # saved by an editor without the hook: the outputs are on disk
    assert "42" in path.read_text() and "language_info" in path.read_text()
    assert _git(repo, "diff") == ""  # git compares the filtered file: nothing changed
    # (`git status` may still list it: git takes a changed size for a change without reading the file)
    ran.cells[2].source = "print(SCALE * 50)"
    nbformat.write(ran, path)
    changed = [line for line in _git(repo, "diff").splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert changed == ['-    "print(SCALE * 21)"', '+    "print(SCALE * 50)"'], changed
    _git(repo, "commit", "-qam", "an edit")
    committed = _git(repo, "show", "HEAD:notebooks/01_a.ipynb")
    assert "50" in committed and "42" not in committed and "widgets" not in committed
    assert committed == strip_text(committed)


def test_saving_from_jupyter_leaves_git_status_clean_and_an_edit_shows(tmp_path):
    """JupyterLab saves through jupyter_server's contents manager: with the pre-save hook scripts/setup.sh
    configures, a notebook run in notebooks/ is saved in its committed form and `git status` is empty; an
    edit still shows, and a copy outside notebooks/ keeps its outputs."""
    pytest.importorskip("jupyter_server")
    from jupyter_server.services.contents.filemanager import FileContentsManager

    from nbstrip import pre_save_hook_for

    repo, path, nbformat = _course_repo(tmp_path)
    ran = _as_jupyterlab_leaves_it(nbformat, path)
    manager = FileContentsManager(root_dir=str(repo), pre_save_hook=pre_save_hook_for(repo / "notebooks"))
    manager.save({"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(ran))},
                 "notebooks/01_a.ipynb")
    assert _git(repo, "status", "--porcelain") == ""
    assert _git(repo, "diff") == ""

    ran.cells[2].source = "print(SCALE * 50)"
    manager.save({"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(ran))},
                 "notebooks/01_a.ipynb")
    assert _git(repo, "status", "--porcelain").split() == ["M", "notebooks/01_a.ipynb"]

    (repo / "my-notebooks").mkdir()
    manager.save({"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(ran))},
                 "my-notebooks/01_a.ipynb")
    assert '"text": [\n      "42\\n"' in (repo / "my-notebooks" / "01_a.ipynb").read_text()  # the copy keeps its output
