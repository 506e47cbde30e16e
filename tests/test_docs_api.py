"""The API reference covers every public name that STYLE.md promises, each with a real docstring.

Each name must (1) import from its hvlab module, (2) carry a docstring that is not empty and not the
placeholder Python writes for a dataclass or a dict, and (3) be documented on a page of docs/api/: either
by a `::: hvlab.module` block whose module defines it (mkdocstrings renders every public member that has
a docstring) or by its own `::: hvlab.module.Name` block. PROMPT_TEMPLATE is a dict, which has no docstring
of its own: its module's docstring must explain it and the API page must name it.
"""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"

# STYLE.md's list, with the module that defines each ("crop_start" is computed by derive_crop_start).
STYLE_NAMES = {
    "HYVideoDiffusionTransformer": "hvlab.model",
    "MMDoubleStreamBlock": "hvlab.blocks",
    "MMSingleStreamBlock": "hvlab.blocks",
    "SingleTokenRefiner": "hvlab.refiner",
    "ModulateDiT": "hvlab.modulation",
    "modulate": "hvlab.modulation",
    "apply_gate": "hvlab.modulation",
    "get_nd_rotary_pos_embed": "hvlab.rope",
    "apply_rotary_emb": "hvlab.rope",
    "unpatchify": "hvlab.model",
    "params_count": "hvlab.model",
    "FlowMatchDiscreteScheduler": "hvlab.scheduler",
    "AutoencoderKLCausal3D": "hvlab.vae",
    "derive_crop_start": "hvlab.prompts",
}
PLACEHOLDER = re.compile(r"^\w+\(.*\)$", re.S)  # what @dataclass writes when a class has no docstring


def api_blocks() -> dict[str, str]:
    """`::: target` identifier -> the page that holds it."""
    blocks = {}
    for page in sorted(API.glob("*.md")):
        for m in re.finditer(r"^:::\s+([\w.]+)", page.read_text(), re.M):
            blocks[m.group(1)] = page.name
    return blocks


def test_api_pages_exist():
    assert API.is_dir(), f"expected the API reference in {API}"
    assert api_blocks(), f"no '::: hvlab.module' blocks in {API}/*.md"


@pytest.mark.parametrize("name", sorted(STYLE_NAMES))
def test_style_name_has_docstring_and_api_entry(name):
    module = STYLE_NAMES[name]
    obj = getattr(importlib.import_module(module), name)
    doc = (obj.__doc__ or "").strip()
    assert doc, f"{module}.{name} has no docstring"
    assert not PLACEHOLDER.match(doc), f"{module}.{name} has only the auto-generated docstring {doc[:60]!r}"
    assert len(doc.split()) >= 4, f"{module}.{name}'s docstring is too short to teach anything: {doc!r}"
    blocks = api_blocks()
    assert module in blocks or f"{module}.{name}" in blocks, (
        f"{module}.{name} is not in the API reference: add '::: {module}' to a page in docs/api/")


def test_prompt_template_is_documented():
    prompts = importlib.import_module("hvlab.prompts")
    assert isinstance(prompts.PROMPT_TEMPLATE, dict)
    doc = prompts.__doc__ or ""
    assert "crop_start" in doc and "template" in doc.lower(), "hvlab.prompts' docstring must explain the templates"
    page = API / api_blocks().get("hvlab.prompts", "missing.md")
    assert page.exists(), "hvlab.prompts is not in the API reference"
    text = page.read_text()
    assert "PROMPT_TEMPLATE" in text, f"{page.name} must name PROMPT_TEMPLATE"
    # The page states the two official crop_start values; they must be the dict's.
    for key, entry in prompts.PROMPT_TEMPLATE.items():
        assert f'"{key}"' in text and f"`crop_start` {entry['crop_start']}" in text, (
            f"{page.name} must state crop_start {entry['crop_start']} for {key!r}")


def test_every_api_target_is_an_hvlab_module_or_member():
    for target, page in api_blocks().items():
        parts = target.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"docs/api/{page}: '::: {target}': {attr!r} not found"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"docs/api/{page}: '::: {target}' names no importable module")


def test_course_list_matches_the_issue():
    """mkdocs.yml lists the thirteen notebooks of the course in order, by the agreed file names, then the later
    chapters in increasing order (15: step caching, issue 21)."""
    text = (ROOT / "mkdocs.yml").read_text()
    block = re.search(r"course_notebooks:\n((?:\s+- \S+\n)+)", text)
    assert block, "mkdocs.yml needs extra.course_notebooks"
    names = re.findall(r"- (\S+)", block.group(1))
    assert [n[:2] for n in names[:13]] == [f"{i:02d}" for i in range(1, 14)], names
    assert names[0] == "01_pipeline_at_a_glance" and names[12] == "13_training_the_toy"
    later = [int(n[:2]) for n in names[13:]]
    assert later == sorted(set(later)) and all(k > 13 for k in later), names
    assert "15_skipping_steps_caching_the_dit" in names
