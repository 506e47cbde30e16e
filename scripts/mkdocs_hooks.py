"""mkdocs hooks for the hvlab site (wired in mkdocs.yml under `hooks:`).

1. The course in the nav: `extra.course_notebooks` in mkdocs.yml lists the notebooks in order; each
   becomes a nav entry titled with the notebook's H1. A listed notebook that does not exist is a warning
   (so `mkdocs build --strict` fails in CI), downgraded to a note with HVLAB_DOCS_ALLOW_MISSING=1 for
   local builds while the course is being written. Notebooks not in the list are added at the end.
2. The notebooks' pages come from their executed copies in build/ (scripts/execute_notebooks.py runs
   them once under nbmake and keeps the outputs); mkdocs-jupyter renders them with `execute: false`.
   A copy that is missing, or made from an older version of its source, is a warning.
3. The home page's figure: a toy-model generation (GIF + frame strip) made with the shipped weights,
   regenerated when the weights change, kept in build/figures/.
4. MathJax for the notebooks' LaTeX, served from the site itself (the MathJax 2.7 copy that the
   `jupyter-server-mathjax` package ships), so no page loads anything from the internet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.hvlab")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
FIGURES = BUILD / "figures"
HOME_FIGURES = ("toy_generation.gif", "toy_frames.png")  # published as assets/generated/<name>
HOME_PROMPT = "a red circle moving right"
HOME_SEED = 0
COURSE_KEY = "Course"

MATHJAX_CONFIG = """\
// hvlab: the site's MathJax 2.7 comes from the jupyter-server-mathjax package, which ships the HTML-CSS
// output with the STIX-Web fonts only. Every choice below avoids a request that would fail (a console error):
// (loaded before the combined config: mkdocs.yml's custom_mathjax_url lists "hvlab" first)
// - HTML-CSS, not the native MathML output that the "HTMLorMML" config picks in Chromium (its @font-face
//   rules name TeX .otf fonts that are not shipped);
// - STIX-Web web fonts (the TeX web fonts are not shipped);
// - the blank test font from local() instead of url('about:blank'), which Chromium refuses with a CORS error.
MathJax.Hub.Config({
  MMLorHTML: {prefer: "HTML"},
  "HTML-CSS": {
    availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", imageFont: null,
    styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax_Blank')"}}
  },
  // Chromium renders MathML natively, and MathJax's MathML output names six TeX .otf web fonts:
  // local() sources instead, so the browser falls back to its own fonts rather than requesting them.
  NativeMML: {styles: {
    "@font-face /*1*/": {"font-family": "MathJax_Caligraphic-WEB", src: "local('MathJax_Caligraphic')"},
    "@font-face /*2*/": {"font-family": "MathJax_Caligraphic-WEB", "font-weight": "bold", src: "local('MathJax_Caligraphic')"},
    "@font-face /*3*/": {"font-family": "MathJax_AMS-WEB", src: "local('MathJax_AMS')"},
    "@font-face /*4*/": {"font-family": "MathJax_Script-WEB", src: "local('MathJax_Script')"},
    "@font-face /*5*/": {"font-family": "MathJax_Fraktur-WEB", src: "local('MathJax_Fraktur')"},
    "@font-face /*6*/": {"font-family": "MathJax_Fraktur-WEB", "font-weight": "bold", src: "local('MathJax_Fraktur')"}
  }},
  menuSettings: {zoom: "None", renderer: "HTML-CSS"}
});
MathJax.Ajax.loadComplete("[MathJax]/config/hvlab.js");
"""


def _allow_missing() -> bool:
    return os.environ.get("HVLAB_DOCS_ALLOW_MISSING", "") not in ("", "0")


def _missing(msg: str) -> None:
    (log.info if _allow_missing() else log.warning)(msg)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _title(path: Path) -> str:
    """The notebook's H1 (its first '# ' line in a markdown cell), else a title made from its file name."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb.get("cells", []):
            if cell.get("cell_type") != "markdown":
                continue
            src = cell.get("source", "")
            src = "".join(src) if isinstance(src, list) else src
            for line in src.splitlines():
                if line.startswith("# "):
                    return re.sub(r"[*_`]", "", line[2:]).strip()
    except (OSError, ValueError):
        pass
    num, _, rest = path.stem.partition("_")
    return f"{int(num)}. {rest.replace('_', ' ').capitalize()}" if num.isdigit() else path.stem


def _course(config) -> list[str]:
    """Notebook stems in course order: the listed ones that exist, then any others found."""
    listed = list(config.extra.get("course_notebooks", []))
    present = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    for name in listed:
        if name not in present:
            _missing(f"course notebook notebooks/{name}.ipynb is listed in mkdocs.yml (extra.course_notebooks) "
                     f"but does not exist; found: {sorted(present) or 'none'}")
    extra = sorted(present - set(listed))
    for name in extra:
        log.info(f"notebooks/{name}.ipynb is not in extra.course_notebooks: added at the end of the course")
    # With HVLAB_DOCS_ALLOW_MISSING a missing notebook gets a placeholder page, so links to it resolve.
    return [n for n in listed if n in present or _allow_missing()] + extra


def _placeholder(name: str) -> Path:
    path = BUILD / "placeholders" / f"{name}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    cell = {"cell_type": "markdown", "id": "placeholder", "metadata": {},
            "source": [f"# {_title(NOTEBOOKS / (name + '.ipynb'))}\n", "\n",
                       f"Placeholder: `notebooks/{name}.ipynb` does not exist yet (local build with "
                       "HVLAB_DOCS_ALLOW_MISSING=1)."]}
    path.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def on_config(config):
    course = _course(config)
    entries = [{_title(NOTEBOOKS / f"{n}.ipynb"): f"notebooks/{n}.ipynb"} for n in course]
    for item in config.nav or []:
        if isinstance(item, dict) and COURSE_KEY in item:
            head = item[COURSE_KEY] if isinstance(item[COURSE_KEY], list) else [item[COURSE_KEY]]
            head = [e for e in head if not (isinstance(e, str) and e.endswith(".ipynb"))]
            item[COURSE_KEY] = head + entries
            break
    else:
        log.warning(f"mkdocs.yml's nav needs a '{COURSE_KEY}' entry for the notebooks")
    config["hvlab_course"] = course  # read back in on_files
    return config


def _executed_copy(name: str) -> Path:
    src, out = NOTEBOOKS / f"{name}.ipynb", BUILD / f"{name}.ipynb"
    if not src.exists():
        return _placeholder(name)
    if not out.exists():
        log.warning(f"notebooks/{name}.ipynb has not been executed, so its page would have no outputs: run "
                    f"`python scripts/execute_notebooks.py --stale` (scripts/check_site.sh does) before mkdocs")
        return src
    nb = json.loads(out.read_text(encoding="utf-8"))
    meta = nb.get("metadata", {})
    if meta.get("hvlab", {}).get("source_sha1") != _sha1(src):
        log.warning(f"build/{name}.ipynb was executed from an older notebooks/{name}.ipynb: run "
                    f"`python scripts/execute_notebooks.py --stale`")
    if "widgets" in meta:
        log.warning(f"build/{name}.ipynb carries saved widget state, whose renderer loads from a CDN")
    return out


def _toy_weights_sha1() -> str:
    from hvlab.toy.model import WEIGHTS_DIR

    h = hashlib.sha1()
    for p in sorted(Path(WEIGHTS_DIR).glob("*.safetensors")) + [Path(WEIGHTS_DIR) / "config.json"]:
        h.update(p.name.encode() + str(p.stat().st_size).encode() + str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def make_home_figures(out_dir: Path = FIGURES) -> None:
    """Generate the home page's toy video with the shipped weights (about 10-20 s on a CPU)."""
    import torch

    torch.set_num_threads(1)  # the toy model runs fastest on one thread (see `hvlab generate --threads`)
    from hvlab.toy.model import load_toy
    from hvlab.inspection.viz import frame_grid, save_animation

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_toy()
    out = pipe(HOME_PROMPT, seed=HOME_SEED)
    video = out.videos[0]
    save_animation(video, out_dir / HOME_FIGURES[0], fps=8)
    fig = frame_grid(video, title=f'"{HOME_PROMPT}" (toy model, seed {HOME_SEED}): 8 of {video.shape[1]} frames')
    fig.savefig(out_dir / HOME_FIGURES[1], dpi=110)
    s = out.settings
    (out_dir / "settings.json").write_text(json.dumps(
        {"weights": _toy_weights_sha1(), "prompt": HOME_PROMPT, "seed": HOME_SEED,
         "settings": s.to_dict() if hasattr(s, "to_dict") else str(s)}, indent=2, default=str))


def _home_figures_ready() -> bool:
    meta = FIGURES / "settings.json"
    if not all((FIGURES / n).exists() for n in HOME_FIGURES) or not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("weights") == _toy_weights_sha1()
    except (OSError, ValueError):
        return False


@event_priority(50)  # before mkdocs-jupyter's on_files, which wraps every .ipynb it is given
def on_files(files, config):
    # mkdocs-jupyter needs a File with a real src_dir (its wrapper loses a generated file's path), so the
    # chosen copies are laid out as build/docs_src/notebooks/NAME.ipynb.
    BUILD.mkdir(exist_ok=True)
    if not (BUILD / ".gitignore").exists():  # build/ holds only generated files
        (BUILD / ".gitignore").write_text("# generated by scripts/execute_notebooks.py and the docs build\n*\n")
    src_dir = BUILD / "docs_src"
    if src_dir.exists():
        shutil.rmtree(src_dir)
    (src_dir / "notebooks").mkdir(parents=True)
    for name in config.get("hvlab_course", []):
        uri = f"notebooks/{name}.ipynb"
        old = files.get_file_from_path(uri)
        if old is not None:
            files.remove(old)
        shutil.copyfile(_executed_copy(name), src_dir / uri)
        files.append(File(uri, src_dir=str(src_dir), dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))

    try:
        if not _home_figures_ready():
            log.info("generating the home page's toy video (build/figures/) ...")
            make_home_figures()
    except Exception as err:  # noqa: BLE001 - the build reports it and --strict fails
        log.warning(f"could not generate the home page figure with the toy model: {type(err).__name__}: {err}")
    for name in HOME_FIGURES:
        if (FIGURES / name).exists():
            files.append(File.generated(config, f"assets/generated/{name}", abs_src_path=str(FIGURES / name)))
    return files


def on_post_build(config):
    try:
        import jupyter_server_mathjax
    except ImportError:
        log.warning("jupyter-server-mathjax is not installed (the docs extra): the notebooks' LaTeX needs it")
        return
    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    dst = Path(config.site_dir) / "assets" / "mathjax"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)  # ~12 MB; MathJax loads the parts a page needs on demand
    (dst / "config" / "hvlab.js").write_text(MATHJAX_CONFIG)
