"""The HTML report opens in a real browser: every image loads and every table is present; a
quick-style report (every method of the quick suite on two tasks, failures, an unconverged run,
method diagnostics, scaling and tensor-product sections) fits a 1400 px wide window without
horizontal scrolling, with the anomaly banner and a verdict table per task.

Uses Debian's chromium + chromium-driver (installed by scripts/test.sh) through selenium."""
from __future__ import annotations

import shutil

import pytest

import equibench as eb
from equibench.metrics.catalogue import MetricSpec, find_metric, register_metric
from equibench.results.store import append_block, read_records

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM),
                                reason="chromium and chromium-driver are not installed (scripts/test.sh installs them)")

QUICK_METHODS = ("baseline", "augmentation", "e3nn", "frame_averaging", "canonicalization", "pca_canonicalization",
                 "tensor_frames", "local_canonicalization", "escnn")
EXACT = ("e3nn", "frame_averaging", "canonicalization", "pca_canonicalization", "tensor_frames",
         "local_canonicalization", "escnn")
WIDTH = 1400


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", f"--window-size={WIDTH},1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("res")
    df = eb.run("smoke", results_dir=root, run_name="b", isolate=False, progress=False,
                methods=["baseline", "augmentation"])
    return root / "b", df


def test_report_renders_with_all_images_and_tables(tmp_path, browser, smoke_run):
    run_dir, df = smoke_run
    index = eb.write_report(run_dir, tmp_path / "rep")
    browser.get(index.resolve().as_uri())
    state = browser.execute_script("""
        const imgs = Array.from(document.images);
        return {n_img: imgs.length,
                broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                tables: document.querySelectorAll('table').length,
                rows: Array.from(document.querySelectorAll('table.results tbody tr')).map(r => r.cells[0].textContent),
                title: document.title};
    """)
    assert state["n_img"] >= 3 and state["broken"] == []
    assert state["tables"] >= 2
    assert sorted(state["rows"]) == sorted(set(df["method"]))
    assert "equibench report" in state["title"]


def _diagnostic() -> str:
    """A method-specific degeneracy metric: the methods' own when declared, else one for the test."""
    eb.list_methods()  # the built-in methods declare their metrics on import
    for name in ("test.frame_degenerate_share", "test.degenerate_share"):
        if find_metric(name) is not None:
            return name
    name = "test.degenerate_frame_share_browser_test"
    register_metric(MetricSpec(name, "degenerate-frame share", "test", stat="degenerate_frame_share",
                               stage="trained", log_scale=False,
                               description="share of graphs whose frame is degenerate (eigenvalue gap below the "
                                           "tolerance)"))
    return name


def quick_style(src, dst) -> None:
    """A run directory shaped like the quick suite's, cloned from a smoke run's rows: the quick
    suite's nine methods on nbody and normals (scores spread out, one run not converged, one
    exact method with a degenerate-frame share, canonicaliser diagnostics), a failed spec with a
    long traceback, an out-of-memory spec, and scaling / tensor-product rows."""
    dst.mkdir(parents=True)
    rows = [{k: v for k, v in r.items() if k not in ("block", "block_size")} for r in read_records(src)]
    template = [r for r in rows if r["method"] == "baseline" and r["seed"] == 0]
    diag = _diagnostic()
    for task, metrics in (("nbody", {"mse": "mse"}), ("normals", {"mse": "1-cos2"})):
        for i, method in enumerate(QUICK_METHODS):
            spec_hash = f"{task}-{method}"
            if (task, method) == ("normals", "escnn"):
                append_block(dst, [{**template[0], "task": task, "method": method, "spec_hash": spec_hash,
                                    "metric": "status", "value": None, "status": "out_of_memory",
                                    "error": "worker over the memory limit (4.0 GiB)", "exit_signal": "SIGKILL",
                                    "peak_rss_bytes": 4.3e9, "max_memory_bytes": 4.29e9}])
                continue
            if (task, method) == ("normals", "local_canonicalization"):
                trace = ("Traceback (most recent call last):\n  File \"/work/main/equibench/engine/worker.py\", "
                         "line 88, in run_point\n" + "/very/long/path/without/spaces" * 8
                         + "\nRuntimeError: NaN in the loss")
                append_block(dst, [{**template[0], "task": task, "method": method, "spec_hash": spec_hash,
                                    "metric": "status", "value": None, "status": "failed", "error": trace,
                                    "exit_signal": "SIGABRT"}])
                continue
            block = []
            for r in template:
                r = {**r, "task": task, "method": method, "spec_hash": spec_hash, "run_id": "quick",
                     "exact_claim": method in EXACT}
                metric = r["metric"]
                for old, new in metrics.items():
                    if metric in (f"test.{old}", f"trivial.{old}"):
                        r["metric"] = metric.replace(old, new)
                    if r.get("val_metric") == old:
                        r["val_metric"] = new
                if metric in ("test.mse", "curve.val"):
                    r["value"] = r["value"] * (0.5 + 0.12 * i)
                if method == "tensor_frames":
                    r["convergence"] = "not_converged"
                block.append(r)
            extra = {"test.angle_deg": 35.0 + i} if task == "normals" else {}
            if method == "canonicalization":
                extra |= {"test.identity_metric": 0.12, "test.prior_mse": 0.3, "test.mean_angle_deg": 80.0}
            if method in ("frame_averaging", "pca_canonicalization"):
                extra[diag] = 0.031
            block += [{**template[0], "task": task, "method": method, "spec_hash": spec_hash, "metric": m, "value": v}
                      for m, v in extra.items()]
            append_block(dst, block)
    base = {**template[0], "run_id": "quick", "seed": 0, "status": "ok", "device_name": "test CPU", "repeats": 5,
            "threads": 1, "timer": "torch.utils.benchmark.Timer.timeit", "dtype": "fp32"}
    for method in ("baseline", "frame_averaging", "tensor_frames", "e3nn", "escnn"):
        block = []
        for n in (16, 64, 256, 1024, 4096):
            if method == "escnn" and n == 4096:
                block.append({**base, "bench": "scaling", "task": None, "method": method, "spec_hash": f"sc-{method}",
                              "metric": "status", "value": None, "status": "out_of_memory", "x": n,
                              "x_label": "nodes", "error": "over the memory limit"})
                continue
            for metric, v in (("scaling.time_s", 1e-4 * n ** 1.1), ("scaling.peak_mem_bytes", 1e4 * n)):
                block.append({**base, "bench": "scaling", "task": None, "method": method, "spec_hash": f"sc-{method}",
                              "metric": metric, "value": v, "x": n, "x_label": "nodes", "scaling_task": "nbody",
                              "k_neighbours": 8, "mode": "inference", "mem_method": "profiler"})
        append_block(dst, block)
    for impl in ("e3nn", "gaunt"):
        for cmode in ("uvu", "uvw"):
            block = []
            for lmax in range(1, 7):
                for metric, v in (("tp_bench.time_s", 1e-4 * lmax ** 3), ("tp_bench.time_iqr_s", 1e-6),
                                  ("tp_bench.rel_err_vs_e3nn", 1e-7), ("tp_bench.weights", 100 * lmax ** 2),
                                  ("tp_bench.gflops_per_s", 3.0), ("tp_bench.compile_time_s", 2.0)):
                    block.append({**base, "bench": "tp_bench", "task": None, "method": impl,
                                  "spec_hash": f"tp-{impl}-{cmode}",
                                  "metric": metric, "value": v, "x": lmax, "x_label": "lmax", "channel_mode": cmode,
                                  "mode": "forward", "batch_size": 64, "channels": 16})
            append_block(dst, block)


def test_quick_style_report_fits_1400_px(tmp_path, browser, smoke_run):
    run_dir, _ = smoke_run
    quick_style(run_dir, tmp_path / "res" / "quick")
    index = eb.write_report(tmp_path / "res" / "quick", tmp_path / "rep")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": WIDTH, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    browser.get(index.resolve().as_uri())
    state = browser.execute_script("""
        document.querySelectorAll('details').forEach(d => d.open = true);  // the full tables must fit too
        const doc = document.documentElement;
        const tables = Array.from(document.querySelectorAll('table')).map(t => ({
            cls: t.className, width: t.scrollWidth, room: t.parentElement.clientWidth}));
        const sticking = Array.from(document.body.querySelectorAll('*'))
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
            .map(e => e.tagName + (e.className ? '.' + e.className : '') + (e.id ? '#' + e.id : ''));
        const imgs = Array.from(document.images);
        return {scroll: doc.scrollWidth, inner: window.innerWidth, tables: tables, sticking: sticking,
                broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                banner: document.getElementById('anomalies') ? document.getElementById('anomalies').innerText : null,
                bannerLinks: Array.from(document.querySelectorAll('#anomalies a')).map(a => a.getAttribute('href')),
                verdicts: Array.from(document.querySelectorAll('table.verdict')).map(
                    t => Array.from(t.querySelectorAll('tbody tr')).map(r => r.cells[1].textContent)),
                headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent)};
    """)
    assert state["inner"] == WIDTH
    assert state["scroll"] <= state["inner"], state["sticking"]
    assert state["sticking"] == []
    too_wide = [t for t in state["tables"] if t["width"] > t["room"]]
    assert not too_wide, too_wide
    assert state["broken"] == []
    # the banner, above everything, lists the failed, out-of-memory and unconverged runs, each with a live link
    assert state["banner"] is not None and "Anomalies" in state["banner"]
    for text in ("normals / escnn", "out_of_memory", "normals / local_canonicalization", "NaN in the loss",
                 "tensor_frames", "not converged", "scaling / escnn"):
        assert text in state["banner"], text
    for href in state["bannerLinks"]:
        assert browser.execute_script(f"return document.getElementById({href[1:]!r}) !== null"), href
    # a verdict table per task, with the trivial predictor, before the full table
    assert len(state["verdicts"]) == 2
    for rows in state["verdicts"]:
        assert "trivial predictor" in rows and "baseline" in rows and "e3nn (exact)" in rows
    html = index.read_text()
    assert html.index('class="verdict"') < html.index('class="results"')
    assert "degenerate" in html.split('class="verdict"')[1].split("</table>")[0]  # beside the equivariance error
    assert {"Task: nbody", "Task: normals", "Scaling: cost vs size", "Tensor-product microbenchmarks"} <= \
        set(state["headings"])
