"""Browser check of the built docs site (scripts/check_site.sh serves site/ and calls this).

Opens pages in headless Chromium through chromedriver (selenium) and asserts, for every page checked:
  - it loads (HTTP 200, an <h1>),
  - the browser console logs no SEVERE entry (a JavaScript error or a failed resource load),
  - the page requests nothing outside the served site (the site must work offline: no web fonts, no
    CDN scripts), from the browser's network log,
and, on the home page and on the figure pages (default: notebooks 01 and 08, those present), that at least
one figure rendered: an <img> that finished loading with naturalWidth > 0 (the notebooks' matplotlib
PNGs are inline data: images) or an inline <svg> in a notebook output. Legibility (issue 19), on every page:
  - no code block or table is cut off: one wider than its box scrolls (overflow auto/scroll) and stays inside
    the page's content column;
and on every notebook page:
  - no widget shows as its raw repr ("VBox(children=...)"): the site has no kernel, an explorer shows its picture;
  - no table is plain text too wide for its box (text with aligned columns that wraps or scrolls): tables are
    HTML tables (hvlab.inspection.viz.Table);
  - every figure (an output <img>) is shown at least MIN_FIGURE_PX wide, and at no less than MIN_SCALE of its
    natural size, so that its labels and legends stay readable at page scale.

The pages checked: the home page, every notebook page of the course (read from site/sitemap.xml or the
folders under site/notebooks/), and the first API page. At least one notebook page must be present.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from urllib.parse import urljoin, urlparse
from urllib.request import urlopen

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000"]

FIGURES_JS = """
const root = arguments[0] ? document.querySelector(arguments[0]) : document;
if (!root) return {imgs: 0, svgs: 0, broken: []};
const imgs = [...root.querySelectorAll(arguments[1])];
const ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
const broken = imgs.filter(i => i.complete && i.naturalWidth === 0).map(i => (i.currentSrc || i.src).slice(0, 80));
const svgs = arguments[2] ? root.querySelectorAll(arguments[2]).length : 0;
return {imgs: ok.length, pending: imgs.length - ok.length - broken.length, svgs: svgs, broken: broken};
"""

MIN_FIGURE_PX = 600  # STYLE.md: figures at least ~600 px wide
MIN_SCALE = 0.6  # a figure shown below 60% of its natural size makes 8-point labels ~7 px tall

LAYOUT_JS = """
const notebook = arguments[0], minPx = arguments[1], minScale = arguments[2];
const article = document.querySelector('article') || document.body;
const right = article.getBoundingClientRect().right;
const res = {cut: [], widgets: [], text_tables: [], narrow: [], shrunk: [], figures: 0};
const short = el => (el.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 60);
for (const el of article.querySelectorAll('pre, table')) {
  if (!el.getClientRects().length) continue;  // hidden (a collapsed block)
  const wide = el.scrollWidth > el.clientWidth + 1;
  const scrolls = [el, el.parentElement].some(e => e && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX));
  const box = el.getBoundingClientRect();
  if ((wide && !scrolls) || box.right > right + 1) res.cut.push(`${el.tagName.toLowerCase()} "${short(el)}"`);
}
if (notebook) {
  const WIDGET = /^(VBox|HBox|Box|GridBox|Accordion|Tab|Output|IntSlider|FloatSlider|Dropdown|Image|Button|Checkbox)\\(/m;
  for (const pre of article.querySelectorAll('.jp-OutputArea-output pre')) {
    const text = pre.textContent;
    if (WIDGET.test(text) || text.includes('children=(')) res.widgets.push(short(pre));
    const lines = text.replace(/\\n+$/, '').split('\\n');
    const aligned = lines.filter(l => /\\S {2,}\\S/.test(l.trim()) || /\\S \\| \\S/.test(l)).length;
    if (lines.length < 3 || aligned < 2) continue;
    const probe = pre.cloneNode(true);  // the same text, unwrapped: how wide the table needs to be
    Object.assign(probe.style, {whiteSpace: 'pre', position: 'absolute', visibility: 'hidden', width: 'auto'});
    pre.parentElement.appendChild(probe);
    const need = probe.scrollWidth;
    probe.remove();
    if (need > pre.clientWidth + 1) res.text_tables.push(`"${short(pre)}" needs ${need} px, has ${pre.clientWidth}`);
  }
  for (const img of article.querySelectorAll('.jp-OutputArea-output img')) {
    if (!img.complete || !img.naturalWidth || !img.getClientRects().length) continue;
    res.figures += 1;
    const w = img.getBoundingClientRect().width, label = (img.alt || img.src.slice(0, 40)).slice(0, 60);
    if (w < minPx - 0.5) res.narrow.push(`${label}: ${Math.round(w)} px`);
    if (w / img.naturalWidth < minScale) res.shrunk.push(`${label}: ${img.naturalWidth} px shown at ${Math.round(w)}`);
  }
}
return res;
"""

MATHJAX_IDLE_JS = """
const M = window.MathJax;
if (!M || !M.Hub || !M.Hub.queue) return true;
return M.Hub.queue.pending === 0 && !M.Hub.queue.running;
"""


def notebook_pages(site: pathlib.Path) -> list[str]:
    nb_dir = site / "notebooks"
    return sorted(f"notebooks/{p.parent.name}/" for p in nb_dir.glob("*/index.html")) if nb_dir.exists() else []


def make_driver(chromium: str, chromedriver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def check_page(driver, base: str, path: str, need_figure: bool, notebook: bool, timeout: float) -> list[str]:
    url = urljoin(base, path)
    errors = []
    with urlopen(url) as r:  # the browser does not report HTTP status codes to WebDriver
        if r.status != 200:
            return [f"{path}: HTTP {r.status}"]
    driver.get_log("browser"), driver.get_log("performance")  # drop the previous page's entries
    driver.get(url)
    scope, imgs, svgs = (".jupyter-wrapper", ".jp-OutputArea-output img",
                         ".jp-OutputArea-output svg") if notebook else ("article", "img", None)
    deadline, fig = time.time() + timeout, {}
    while time.time() < deadline:  # images decode and MathJax typesets after the load event
        ready = driver.execute_script("return document.readyState") == "complete"
        fig = driver.execute_script(FIGURES_JS, scope, imgs, svgs)
        if ready and not fig.get("pending") and driver.execute_script(MATHJAX_IDLE_JS):
            break
        time.sleep(0.2)
    time.sleep(0.5)  # late console messages (e.g. a font that failed to load)

    h1 = driver.execute_script("const h = document.querySelector('h1'); return h ? h.textContent.trim() : ''")
    if not h1:
        errors.append(f"{path}: no <h1>")
    n_out = driver.execute_script("return document.querySelectorAll('.jp-OutputArea-output').length")
    if notebook and n_out == 0:
        errors.append(f"{path}: a notebook page without outputs (was it executed?)")
    if fig.get("broken"):
        errors.append(f"{path}: images that failed to load: {fig['broken']}")
    if need_figure and fig.get("imgs", 0) + fig.get("svgs", 0) == 0:
        errors.append(f"{path}: no rendered figure (no loaded <img> with naturalWidth > 0, no inline <svg>) "
                      f"in {scope}")
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    errors += [f"{path}: console error: {e.get('message', '')[:300]}" for e in severe]
    host = urlparse(base).netloc
    outside = sorted({u for u in requested_urls(driver)
                      if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).netloc != host})
    errors += [f"{path}: requested a resource outside the site: {u}" for u in outside]
    layout = driver.execute_script(LAYOUT_JS, notebook, MIN_FIGURE_PX, MIN_SCALE)
    errors += [f"{path}: cut off at the page's width (neither fits nor scrolls): {c}" for c in layout["cut"]]
    errors += [f"{path}: a widget shown as its raw repr (the site has no kernel): {w}" for w in layout["widgets"]]
    errors += [f"{path}: a table printed as text, wider than its box (make it an HTML table, "
               f"hvlab.inspection.viz.Table): {t}" for t in layout["text_tables"]]
    errors += [f"{path}: a figure narrower than {MIN_FIGURE_PX} px: {n}" for n in layout["narrow"]]
    errors += [f"{path}: a figure shrunk below {MIN_SCALE:.0%} of its size, its labels unreadable (make it "
               f"narrower): {n}" for n in layout["shrunk"]]
    maths = driver.execute_script("return document.querySelectorAll('.MathJax, .MathJax_Display').length")
    print(f"  {'ok ' if not errors else 'BAD'} {path or '/'}: h1 {h1[:50]!r}, figures {fig.get('imgs', 0)} img + "
          f"{fig.get('svgs', 0)} svg, outputs {n_out}, typeset maths {maths}, console errors {len(severe)}, "
          f"outside requests {len(outside)}, legibility problems "
          f"{sum(len(layout[k]) for k in ('cut', 'widgets', 'text_tables', 'narrow', 'shrunk'))}")
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="where site/ is served, e.g. http://127.0.0.1:8000/")
    ap.add_argument("--site-dir", default="site")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    ap.add_argument("--figure-pages", nargs="*",
                    default=["notebooks/01_pipeline_at_a_glance/", "notebooks/08_flow_matching_scheduler/"],
                    help="notebook pages that must show a figure (those present; at least one must be)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a page's figures")
    args = ap.parse_args(argv)
    base = args.base_url if args.base_url.endswith("/") else args.base_url + "/"

    site = pathlib.Path(args.site_dir)
    notebooks = notebook_pages(site)
    if not notebooks:
        sys.exit(f"no notebook pages in {site}/notebooks/: the course is missing from the site")
    figure_pages = [p for p in args.figure_pages if p in notebooks] or notebooks[:1]
    api = sorted(p.parent.name for p in (site / "api").glob("*/index.html"))[:1]
    pages = [("", True, False)] + [(p, p in figure_pages, True) for p in notebooks] + \
            [(f"api/{a}/", False, False) for a in api]

    errors = []
    with tempfile.TemporaryDirectory(prefix="hvlab-chromium-") as profile:
        driver = make_driver(args.chromium, args.chromedriver, profile)
        try:
            print(f"browser check: {len(pages)} pages of {base} in {driver.capabilities.get('browserName')} "
                  f"{driver.capabilities.get('browserVersion')} (figures required on: /, {', '.join(figure_pages)})")
            for path, need_figure, is_nb in pages:
                errors += check_page(driver, base, path, need_figure, is_nb, args.timeout)
        finally:
            driver.quit()
    if errors:
        print("browser check FAILED:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    print(f"browser check passed: {len(pages)} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
