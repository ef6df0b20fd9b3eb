"""The HTML report and `convae show`: the installed CLI in subprocesses, the file it writes checked
for self-containment, and opened in a real browser (headless Chromium) to see it render."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_user_error, convae  # noqa: E402
from convae import ConvAutoencoder
from convae.data import ImageData, load_dataset
from convae.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
SECTIONS = [
    "card", "curves", "recon", "outliers", "filters", "receptive", "maps", "patches", "maximize", "embedding", "interpolate",
    "probe", "depth",
]  # fmt: skip
DEPTH = "Accuracy by depth: trained vs random weights"
PROBE = {
    "rows": [
        {
            "features": f,
            "classifier": "logreg",
            "dim": d,
            "labels_per_class": "all",
            "accuracy": a,
            "macro_f1": a,
            "fit_seconds": 0.2,
        }
        for f, d, a in (
            ("stage1/grid4", 128, 0.95),
            ("bottleneck/grid4", 256, 0.93),
            ("random/stage1/grid4", 128, 0.91),
            ("random/bottleneck/grid4", 256, 0.9),
            ("pixels", 64, 0.9),
            ("pca", 32, 0.89),
        )
    ]
}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(page)
    return p.tags


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    convae("fit", "digits", "--out", run, "--epochs", 2, "--widths", "8,16", "--device", "cpu", "--quiet")
    return run


@pytest.fixture(scope="module")
def report(digits_run):
    probe = digits_run.parent / "probe.json"
    probe.write_text(json.dumps(PROBE))
    out = digits_run.parent / "report.html"
    proc = convae(
        "report", digits_run, "digits:test", "-o", out, "--probe", probe, "--max-images", 300, "--steps", 40,
        "--precision", "float32", "--quiet",
    )  # fmt: skip
    return out, proc


def test_report_is_one_self_contained_file(report):
    out, proc = report
    assert re.fullmatch(rf"wrote {re.escape(str(out))} \(13 sections\) in \d+\.\d s\n", proc.stdout)
    page = out.read_text(encoding="utf-8")
    tags = parse(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "base"}
    assert "@import" not in page and "url(" not in page and "http://" not in page and "https://" not in page
    csp = [a for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]["content"]
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) >= 9
    for src in images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) > 50
    ids = [a["id"] for t, a in tags if t == "section"]
    assert ids == SECTIONS
    assert "Not shown" not in page  # digits with labels and a probe: every section
    for fragment in ("stage1.conv1", "bottleneck", "PSNR (dB)", "training time", "digits:test", "logreg"):
        assert fragment in page
    assert re.search(r"Made .* by convae \S+ on cpu \(precision float32\) in \d+\.\d s", page)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: apt-get install chromium)")
def test_a_browser_renders_the_report_and_loads_every_image(report, tmp_path):
    out, _ = report
    page = out.read_text(encoding="utf-8")
    n_images = page.count("<img ")
    # A copy with a checker: the report itself runs no script, so its policy is relaxed for this one.
    checker = (
        "<script>window.addEventListener('load', function () {"
        "var all = Array.from(document.images);"
        "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; });"
        "document.body.setAttribute('data-loaded', ok.length + '/' + all.length);});</script>"
    )
    probe = tmp_path / "checked.html"
    probe.write_text(
        page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';").replace(
            "</body>", checker + "</body>"
        ),
        encoding="utf-8",
    )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, dom.stdout[:500]
    assert loaded.group(1) == loaded.group(2) == str(n_images)

    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, *flags, "--window-size=1280,2400", "--hide-scrollbars", f"--screenshot={shot}", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.std() > 20  # text, tables and figures, not a blank page
    assert (arr < 128).mean() > 0.01  # enough dark ink
    assert (arr[arr.shape[0] // 2 :] < 250).mean() > 0.02  # and it goes on past the first half (the figures)


@pytest.mark.parametrize("view", ["patches", "curves", "probe"])  # every view is drawn in test_visualize
def test_show_writes_a_view(view, digits_run, tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    out = tmp_path / f"{view}.png"
    data = [] if view == "curves" else ["digits:test"]  # DATA is optional where the view needs no images
    proc = convae(
        "show", digits_run, *data, "--view", view, "-o", out, "--probe", probe, "--max-images", 200, "--quiet"
    )
    assert proc.stdout.strip() == f"wrote {out}"
    with Image.open(out) as img:
        assert img.format == "PNG" and min(img.size) > 100
        assert np.asarray(img.convert("L")).std() > 10


def test_show_takes_split_layer_names(digits_run, tmp_path):
    out = tmp_path / "maps.png"
    proc = convae(
        "show", digits_run, "digits:test", "--view", "maps", "--layers", "stage1.conv1.split,stage1", "-o", out, "-q"
    )
    assert proc.stdout.strip() == f"wrote {out}"
    with Image.open(out) as img:
        assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 10


def test_user_errors_are_one_line_and_exit_2(digits_run, tmp_path):
    assert_user_error(
        convae("show", digits_run, "digits", "--view", "colours", "-o", tmp_path / "x.png", check=False),
        "--view colours",
        "filters",
    )
    assert_user_error(convae("show", digits_run, "--view", "maps", "-o", tmp_path / "x.png", check=False), "needs DATA")
    assert_user_error(
        convae("report", digits_run, "digits", "-o", tmp_path / "r.txt", check=False), "name the report .html"
    )
    assert_user_error(
        convae(
            "report", digits_run, "digits", "-o", tmp_path / "r.html", "--probe", tmp_path / "none.json", check=False
        ),
        "--probe",
        "no such file",
    )
    assert_user_error(
        convae("report", tmp_path / "norun", "digits", "-o", tmp_path / "r.html", check=False), "no such run directory"
    )
    assert not list(tmp_path.glob("*.html")) and not list(tmp_path.glob("*.png"))  # nothing half-written


def test_dense_model_on_unlabelled_data_says_what_is_missing(tmp_path, one_thread):
    images = load_dataset("digits", "test").images
    ConvAutoencoder(arch="dense", hidden=(32,), latent_dim=8, epochs=1, device="cpu").fit(
        images, run_dir=tmp_path / "run"
    )
    data = ImageData(images, None, None, "unlabelled digits")
    result = write_report(
        tmp_path / "run", data, tmp_path / "r.html", max_images=200, maximize_steps=20, tsne_points=100
    )
    page = result.path.read_text(encoding="utf-8")
    assert set(result.skipped) == {"Feature maps", "Receptive fields", "Probe accuracy by layer", DEPTH}
    assert "vectors, not maps" in result.skipped["Feature maps"]
    assert "whole image" in result.skipped["Receptive fields"]
    assert "unlabelled digits has no labels" in page and "not coloured by class" in page
    assert "dense autoencoder" in page and "templates" in page
    assert page.count("Not shown:") == 4
    assert page.count("<img ") == 8  # curves, recon, outliers, filters, patches, maximize, embedding, interpolate
    assert 0 < result.seconds < 120


def test_rgb_report_on_cifar10(shared_datasets, tmp_path, one_thread):
    test = load_dataset("cifar10", "test", data_dir=shared_datasets, download=False)
    data = ImageData(test.images[:240], test.labels[:240], test.classes, "cifar10:test[:240]")
    ConvAutoencoder(channels=(8, 16), epochs=1, batch_size=64, device="cpu").fit(data.images, run_dir=tmp_path / "run")
    result = write_report(
        tmp_path / "run", data, tmp_path / "r.html", maximize_steps=20, tsne_points=150, channels=4, top_k=4
    )
    assert set(result.skipped) == {"Probe accuracy by layer", DEPTH}
    page = result.path.read_text(encoding="utf-8")
    assert "32 x 32 x 3" in page and "has no labels" not in page
    assert page.count("<img ") == 10  # every view but the probe
