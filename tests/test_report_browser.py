"""The HTML report opens in a real browser: every image loads and every table is present.

Uses Debian's chromium + chromium-driver (installed by scripts/test.sh) through selenium."""
from __future__ import annotations

import shutil

import pytest

import equibench as eb

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="chromium and chromium-driver are not installed (scripts/test.sh installs them)")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def test_report_renders_with_all_images_and_tables(tmp_path, browser):
    df = eb.run("smoke", results_dir=tmp_path / "res", run_name="b", isolate=False, progress=False,
                methods=["baseline", "augmentation"])
    index = eb.write_report(tmp_path / "res" / "b", tmp_path / "rep")
    browser.get(index.resolve().as_uri())
    state = browser.execute_script("""
        const imgs = Array.from(document.images);
        return {n_img: imgs.length,
                broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                tables: document.querySelectorAll('table').length,
                rows: Array.from(document.querySelectorAll('table.results tbody tr')).map(r => r.cells[0].innerText),
                title: document.title};
    """)
    assert state["n_img"] >= 2 and state["broken"] == []
    assert state["tables"] >= 1
    assert sorted(state["rows"]) == sorted(set(df["method"]))
    assert "equibench report" in state["title"]
