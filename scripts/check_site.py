"""Browser check of the built docs site (scripts/check_site.sh serves site/ and calls this).

Opens pages in headless Chromium through chromedriver (selenium) and asserts, for every page checked:
  - it loads (HTTP 200, an <h1>),
  - the browser console logs no SEVERE entry (a JavaScript error or a failed resource load),
  - the page requests nothing outside the served site (the site must work offline: no web fonts, no
    CDN scripts), from the browser's network log,
and, on the home page and on the figure pages (default: notebooks 01 and 08, those present), that at least
one figure rendered: an <img> that finished loading with naturalWidth > 0 (the notebooks' matplotlib
PNGs are inline data: images) or an inline <svg> in a notebook output.

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
    maths = driver.execute_script("return document.querySelectorAll('.MathJax, .MathJax_Display').length")
    print(f"  {'ok ' if not errors else 'BAD'} {path or '/'}: h1 {h1[:50]!r}, figures {fig.get('imgs', 0)} img + "
          f"{fig.get('svgs', 0)} svg, outputs {n_out}, typeset maths {maths}, console errors {len(severe)}, "
          f"outside requests {len(outside)}")
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
