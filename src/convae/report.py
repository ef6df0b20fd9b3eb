"""A self-contained HTML report of a run: a model card and a section per view.

One file, with every image inline as a PNG data URI, the styles inline and no script, font
or link to anything outside it; a Content-Security-Policy forbids the browser to fetch
anything else, so the report reads the same offline, attached to an email or years later.
Views that do not apply (feature maps of the dense autoencoder) and label-based parts on
data without labels are kept as sections that say why they are missing.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import visualize as V
from ._io import atomic_write_text
from ._version import __version__
from .errors import ConfigError
from .features import feature_layer_names

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 1180px; margin: 0 auto; padding: 20px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 20px; margin: 34px 0 6px;
     border-bottom: 1px solid #d8dde6; padding-bottom: 4px; } h3 { font-size: 16px; margin: 18px 0 6px; }
.meta { color: #5a6476; font-size: 13px; } p.what { color: #3b4456; margin: 4px 0 10px; }
.note { background: #f4f6fa; border-left: 4px solid #8a9bb8; padding: 8px 12px; margin: 10px 0; }
.warn { background: #fff6e5; border-left: 4px solid #e0a030; padding: 8px 12px; margin: 10px 0; }
figure { margin: 10px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eef0f4; }
figcaption { color: #5a6476; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d8dde6; padding: 3px 8px; text-align: right; }
th { background: #f4f6fa; } td:first-child, th:first-child { text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: 18px; } .cards > div { flex: 1 1 320px; }
nav ol { columns: 2; font-size: 14px; } code { background: #f4f6fa; padding: 0 3px; }
.timing { color: #8a93a6; font-size: 12px; }
"""


@dataclass
class Section:
    id: str
    title: str
    what: str  # one sentence: what the view shows and how to read it
    body: str = ""  # HTML
    skipped: str = ""  # why the view is missing, when it is
    seconds: float = 0.0


@dataclass
class ReportResult:
    path: Path
    seconds: float
    sections: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # section title -> why it is missing


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ", ".join(map(str, value))
    return str(value)


def html_table(rows: Sequence[dict], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(items: Sequence[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in items)
    return f"<table><tbody>{rows}</tbody></table>"


def figure_html(fig, alt: str, caption: str = "") -> str:
    """A matplotlib figure as an inline PNG <figure> (the figure is closed)."""
    data = base64.b64encode(V.figure_png(fig)).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
# (id, title, what the view shows and how to read it), in report order
PLAN: tuple[tuple[str, str, str], ...] = (
    ("card", "Model card", "What was trained, on what, how long it took and how well it reconstructs."),
    ("curves", "Training curves", "Loss, validation PSNR and SSIM and the learning rate, epoch by epoch (history.csv)."),
    ("recon", "Reconstructions", "Originals (top), reconstructions (middle) and the absolute error per pixel (bottom)."),
    (
        "filters", "First-layer filters",
        "The first layer's weights, strongest first: edge, corner and (for colour images) colour-gradient detectors.",
    ),
    (
        "receptive", "Receptive fields",
        "How much of the image one unit sees, layer by layer: it grows with depth, which is why deeper layers "
        "can respond to parts and objects.",
    ),
    (
        "maps", "Feature maps",
        "Activations of the first images at every encoder layer, the most variable channels, each scaled to its own range.",
    ),
    (
        "patches", "Top-activating patches",
        "For each depth, the channels that vary most over the data and the image regions that excite each most, "
        "cropped to the unit's exact receptive field: edges first, then parts, then whole objects.",
    ),
    (
        "maximize", "Activation maximization",
        "For deeper layers, whose weights are not pictures: the input each channel prefers, found by regularized "
        "gradient ascent from gray.",
    ),
    (
        "embedding", "Embedding of the bottleneck",
        "The bottleneck codes in 2-D: PCA (linear) and t-SNE (neighbourhoods); classes that separate here are easy "
        "to read off the code.",
    ),
    (
        "probe", "Probe accuracy by layer",
        "Linear (or other) classifiers on each layer's frozen features, beside pixel, PCA and random-weight baselines.",
    ),
)
_ARCHITECTURES = {
    "conv": "convolutional autoencoder",
    "dense": "dense (fully-connected) autoencoder",
    "sparse": "sparse autoencoder of whitened patches (one wide convolution)",
}
PROBE_COLUMNS = (
    "features", "classifier", "normalize", "augment", "dim", "labels_per_class", "seeds", "accuracy", "accuracy_std", "macro_f1", "fit_seconds",
)


class _Report:
    """The sections of one report; each method returns a section's HTML or raises ViewNotApplicable."""

    def __init__(self, run_dir, data, probe_rows, *, max_images, tsne_points, channels, top_k, steps, seed, device,
                 progress):
        from .run import load_model, read_history
        from .train import resolve_device

        self.run_dir = run_dir
        model, self.config = load_model(run_dir)
        self.model = model.to(resolve_device(device))
        self.device = next(self.model.parameters()).device
        self.history = read_history(run_dir)
        self.probe_rows = probe_rows
        self.images, self.labels = data.images, data.labels
        self.name = getattr(data, "name", "data")
        self.classes = getattr(data, "classes", None)
        V.check_images(self.model, self.images, self.name)
        self.rows = V.sample_indices(len(self.images), max_images, seed)
        self.sample = np.asarray(self.images[self.rows])
        self.sample_labels = None if self.labels is None else np.asarray(self.labels)[self.rows]
        self.conv = self.config.model.arch in ("conv", "sparse")  # spatial maps
        self.tsne_points, self.channels, self.top_k, self.steps, self.seed = tsne_points, channels, top_k, steps, seed
        self.progress = progress
        self.picks: dict[str, list[int]] = {}  # layer -> channels shown, shared by patches and maximize

    def first(self, n: int) -> np.ndarray:
        return np.asarray(self.images[np.arange(min(n, len(self.images)))])

    def card(self) -> str:
        from .model import code_size, describe
        from .train import evaluate

        m, t, history = self.config.model, self.config.train, self.history
        h, w = m.image_size
        seconds = float(np.nansum([r.get("seconds", np.nan) for r in history]))
        last = history[-1] if history else {}
        rates = [r["images_per_s"] for r in history if "images_per_s" in r]
        metrics = evaluate(self.model, self.sample, np.arange(len(self.sample)), self.device, channels_last=False)
        model_items = [
            ("architecture", _ARCHITECTURES[m.arch]),
            ("input (H x W x C)", f"{h} x {w} x {m.in_channels}"),
            ("code size (bottleneck values)", code_size(m)),
            ("parameters", sum(p.numel() for p in self.model.parameters())),
        ]
        skip = {"arch", "in_channels", "image_size"}  # shown above; and the settings this architecture ignores:
        sparse_only = {"sparse_k", "whiten_eps", "patches_per_image"}
        if m.arch == "sparse":
            skip |= {"hidden", "latent_dim", "convs_per_stage", "norm", "activation", "downsample", "upsample", "decoder",
                     "bottleneck", "latent_channels", "code_wta"}
        elif self.conv:
            skip |= sparse_only | {"hidden"} | ({"latent_dim"} if m.bottleneck != "dense" else set())
        else:
            skip |= sparse_only | {"channels", "convs_per_stage", "kernel_size", "downsample", "upsample", "bottleneck",
                                   "latent_channels"}
        model_items += [(k, v) for k, v in asdict(m).items() if k not in skip]
        train_items = [
            ("trained on", self.config.data.spec or "an array"),
            ("training images", self.config.data.num_images),
            ("epochs run", int(last.get("epoch", 0))),
            ("steps", int(last.get("step", 0))),
            ("training time", f"{seconds:.1f} s"),
            ("throughput", f"{np.mean(rates):.0f} images/s" if rates else "-"),
            *asdict(t).items(),
        ]
        recon = [dict(data=f"{self.name} ({len(self.sample)} images)", mse=metrics["mse"], psnr=metrics["psnr"],
                      ssim=metrics["ssim"])]
        if history:
            recon.append(dict(data="validation split, last epoch", mse=last.get("val_mse"), psnr=last.get("val_psnr"),
                              ssim=last.get("val_ssim")))
        versions = f"convae {_e(self.config.convae_version)} trained it; convae {_e(__version__)} made this report."
        return (
            "<h3>Architecture</h3>" + html_table(describe(self.model))
            + '<div class="cards"><div><h3>Model</h3>' + _pairs(model_items) + "</div>"
            + "<div><h3>Training</h3>" + _pairs(train_items) + "</div></div>"
            + "<h3>Reconstruction</h3>"
            + html_table(recon, ["data", "mse", "psnr", "ssim"], ["data", "MSE", "PSNR (dB)", "SSIM"])
            + f'<p class="meta">{versions}</p>'
        )

    def curves(self) -> str:
        return figure_html(V.curves_figure(self.history), "training curves")

    def recon(self) -> str:
        import torch

        originals = self.first(10)
        with torch.inference_mode():
            out = self.model(V._to_input(originals, self.device)).float().permute(0, 2, 3, 1).cpu().numpy()
        return figure_html(V.reconstruction_figure(originals, out, self.name, show_error=True), "reconstructions")

    def filters(self) -> str:
        return figure_html(V.filters_figure(self.model), "first-layer filters")

    def receptive(self) -> str:
        fig = V.receptive_field_figure(self.model, self.first(1)[0])
        table = html_table(
            V.receptive_field_table(self.model),
            ["depth", "layer", "shape", "stride", "receptive_field", "covers"],
            ["depth", "layer", "output (CxHxW)", "stride (px)", "receptive field (px)", "share of the image one unit sees"],
        )
        return figure_html(fig, "receptive-field growth") + table

    def maps(self) -> str:
        return figure_html(V.feature_maps_figure(self.model, self.first(2), channels=self.channels), "feature maps")

    def patches(self) -> str:
        results = V.top_patches(self.model, self.sample, channels=self.channels, k=self.top_k, progress=self.progress)
        self.picks.update({lp.layer: lp.channels for lp in results})
        return figure_html(V.patches_figure(self.model, self.sample, results), "top-activating patches")

    def maximize(self) -> str:
        layers = V.hierarchy_layers(self.model)
        missing = [layer for layer in layers if layer not in self.picks]
        if missing:  # the same choice as the patches section: the most variable channels
            for lp in V.top_patches(self.model, self.sample, missing, channels=self.channels, k=1):
                self.picks[lp.layer] = lp.channels
        bar = V._bar(self.progress, len(layers), "maximize", unit="layer")
        results = []
        try:
            for layer in layers:
                results.append(V.maximize_activation(self.model, layer, self.picks[layer], steps=self.steps, seed=self.seed))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        gain = ", ".join(f"{r.layer}: {np.mean(r.start):.3g} &rarr; {np.mean(r.final):.3g}" for r in results)
        return figure_html(V.maximize_figure(self.model, results), "activation maximization") + (
            f'<p class="meta">Mean activation of the chosen channels, starting image &rarr; synthesized: {gain}.</p>'
        )

    def embedding(self) -> str:
        feats = V.layer_features(self.model, self.sample, "bottleneck", progress=self.progress)
        coords, notes, which = {}, {}, None
        for method, title in (("pca", "PCA"), ("tsne", "t-SNE")):
            try:
                coords[title], which = V.embed(feats, method, max_points=self.tsne_points, seed=self.seed)
            except V.ViewNotApplicable as e:
                notes[title] = str(e)
        labels = None if self.sample_labels is None else self.sample_labels[which]
        fig = V.embedding_figure(coords, labels, self.classes, notes=notes)
        if labels is None:
            extra = '<p class="note">The data has no labels, so the points are not coloured by class.</p>'
        else:
            extra = ""
        pcs = min(50, feats.shape[1], len(which))
        return figure_html(fig, "embedding of the bottleneck") + extra + (
            f'<p class="meta">{len(which)} images; bottleneck codes of {feats.shape[1]} values; t-SNE on their first '
            f"{pcs} principal components.</p>"
        )

    def probe(self) -> str:
        if not self.probe_rows:
            raise V.ViewNotApplicable(
                "no probe results given: run `convae probe RUN_DIR --train DATA:train --test DATA:test "
                "-o results.json` (it needs labelled data) and pass `--probe results.json`"
            )
        fig = V.probe_figure(self.probe_rows, feature_layer_names(self.model))
        columns = [c for c in PROBE_COLUMNS if c in self.probe_rows[0]]
        return figure_html(fig, "probe accuracy by layer") + html_table(self.probe_rows, columns)

    def notices(self) -> list[str]:
        out = []
        if self.labels is None:
            out.append(
                f"{_e(self.name)} has no labels: the embedding is not coloured by class, and probe accuracy needs "
                "labelled data (see its section)."
            )
        if not self.conv:
            out.append(
                "This is the dense autoencoder: it flattens the image, so it has no feature maps and no receptive "
                "fields that grow; those sections say so, and its first layer is shown as whole-image templates."
            )
        if len(self.sample) < len(self.images):
            out.append(
                f"Patches, channel choice, the embedding and the reconstruction metrics use {len(self.sample)} of "
                f"the {len(self.images)} images (sampled with seed {self.seed})."
            )
        return out


def build_report(
    run_dir: str | Path,
    data,
    *,
    probe: str | Path | Sequence[dict] | None = None,
    max_images: int = 3000,
    tsne_points: int = 2000,
    channels: int = 8,
    top_k: int = 8,
    maximize_steps: int = 128,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[str, list[Section], float]:
    """The report's HTML for the run in `run_dir` on `data` (an ImageData of the run's image shape).

    `probe`: a `convae probe` results.json (or its rows). Patches, maximize channels and the
    embedding use at most `max_images` images, drawn with `seed`; t-SNE at most `tsne_points`.
    Returns (html, sections, seconds it took).
    """
    t_start = time.perf_counter()
    limits = (
        ("--max-images", max_images), ("--top-channels", channels), ("--top-k", top_k), ("--steps", maximize_steps),
        ("--tsne-points", tsne_points),
    )
    for option, value in limits:
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    probe_rows = V.load_probe_results(probe) if isinstance(probe, (str, Path)) else (list(probe) if probe else None)
    report = _Report(
        run_dir, data, probe_rows, max_images=max_images, tsne_points=tsne_points, channels=channels, top_k=top_k,
        steps=maximize_steps, seed=seed, device=device, progress=progress,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(PLAN), desc="report", unit="section", dynamic_ncols=True)
    sections = []
    try:
        for sid, title, what in PLAN:
            if bar is not None:
                bar.set_postfix_str(sid, refresh=True)
            section = Section(sid, title, what)
            t0 = time.perf_counter()
            try:
                section.body = getattr(report, sid)()
            except V.ViewNotApplicable as e:
                section.skipped = str(e)
            section.seconds = time.perf_counter() - t0
            sections.append(section)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    page = _page(run_dir, report.name, len(report.images), sections, report.notices(), seconds, str(report.device))
    return page, sections, seconds


def _page(run_dir, data_name: str, n_images: int, sections: list[Section], notices: list[str], seconds: float,
          device: str) -> str:
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    toc = "".join(
        f'<li><a href="#{s.id}">{_e(s.title)}</a>{" (not shown)" if s.skipped else ""}</li>' for s in sections
    )
    parts = []
    for s in sections:
        body = f'<p class="warn">Not shown: {_e(s.skipped)}.</p>' if s.skipped else s.body
        parts.append(
            f'<section id="{s.id}"><h2>{_e(s.title)}</h2><p class="what">{_e(s.what)}</p>{body}'
            f'<p class="timing">{s.seconds:.1f} s</p></section>'
        )
    notes = "".join(f'<p class="note">{n}</p>' for n in notices)
    title = f"convae report: {Path(run_dir).name}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f'<p class="meta">Run <code>{_e(run_dir)}</code> on <code>{_e(data_name)}</code> ({n_images} images). '
        f"Made {_e(when)} by convae {_e(__version__)} on {_e(device)} in {seconds:.1f} s.</p>"
        f"{notes}<nav><ol>{toc}</ol></nav>{''.join(parts)}</body></html>\n"
    )


def write_report(run_dir: str | Path, data, output: str | Path, **options) -> ReportResult:
    """Build the report (see :func:`build_report`) and write it atomically to `output` (.html)."""
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--output {output}: name the report .html")
    page, sections, seconds = build_report(run_dir, data, **options)
    atomic_write_text(output, page)
    return ReportResult(
        path=output, seconds=seconds, sections=[s.title for s in sections],
        skipped={s.title: s.skipped for s in sections if s.skipped},
    )
