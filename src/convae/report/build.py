"""A self-contained HTML report of a run: a model card and a section per view.

One file, with every image inline as a PNG data URI, the styles inline and no script, font
or link to anything outside it; a Content-Security-Policy forbids the browser to fetch
anything else, so the report reads the same offline, attached to an email or years later.
Views that do not apply (feature maps of the dense autoencoder) and label-based parts on
data without labels are kept as sections that say why they are missing. The page is the
Jinja2 template ``templates/report.html``, rendered with autoescaping: every name that comes
from a user (class names, paths, dataset names) is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from .._io import atomic_write_text
from .._version import __version__
from ..errors import ConfigError
from ..features.plan import check_precision
from ..progress import progress_bar
from ..run import load_model, read_history
from ..tensors import allow_bf16, resolve_device
from ..views import REGISTRY, ViewContext, ViewNotApplicable, check_images, draw, figure_png, load_probe_results
from .card import model_card

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
CARD = ("card", "Model card", "What was trained, on what, how long it took and how well it reconstructs.")


@dataclass
class Section:
    id: str
    title: str
    what: str  # one sentence: what the view shows and how to read it
    shown: Any = None  # the drawn view (views.Shown)
    png: str = ""  # its figure, base64
    card: dict | None = None  # the model card's tables
    skipped: str = ""  # why the view is missing, when it is
    seconds: float = 0.0


@dataclass
class ReportResult:
    path: Path
    seconds: float
    sections: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # section title -> why it is missing


def fmt(value) -> str:
    """A table cell: 4 significant digits, thousands separated, '-' for missing values."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ", ".join(map(str, value))
    return str(value)


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("convae.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


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
    precision: str = "auto",
    progress: bool = False,
) -> tuple[str, list[Section], float]:
    """The report's HTML for the run in `run_dir` on `data` (an ImageData of the run's image shape).

    `probe`: a `convae probe` results.json (or its rows). Patches, maximize channels and the
    embedding use at most `max_images` images, drawn with `seed`; t-SNE at most `tsne_points`.
    `precision`: "auto" or "float32", as for :func:`convae.views.render_view`.
    Returns (html, sections, seconds it took).
    """
    t_start = time.perf_counter()
    limits = (
        ("--max-images", max_images), ("--top-channels", channels), ("--top-k", top_k), ("--steps", maximize_steps),
        ("--tsne-points", tsne_points),
    )  # fmt: skip
    _check_limits(limits)
    probe_rows = load_probe_results(probe) if isinstance(probe, (str, Path)) else (list(probe) if probe else None)
    model, config = load_model(run_dir)
    model = model.to(resolve_device(device))
    name = getattr(data, "name", "data")
    check_images(model, data.images, name)
    ctx = ViewContext(
        model,
        data=data,
        history=read_history(run_dir),
        probe_rows=probe_rows,
        channels=channels,
        top_k=top_k,
        max_images=max_images,
        steps=maximize_steps,
        seed=seed,
        tsne_points=tsne_points,
        progress=progress,
        precision=check_precision(precision),
    )
    with allow_bf16(ctx.precision == "auto"):  # the card's reconstruction metrics too, not only the views
        sections = _sections(ctx, config, progress)
    seconds = time.perf_counter() - t_start
    return _page(run_dir, ctx, sections, seconds), sections, seconds


def _check_limits(limits) -> None:
    """Each (option, value) at least 1, else a ConfigError naming the option."""
    for option, value in limits:
        if value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")


def _page(run_dir: str | Path, ctx: ViewContext, sections: list[Section], seconds: float) -> str:
    """The report's HTML: its header (run, data, when, where, precision), notices and sections."""
    name = getattr(ctx.data, "name", "data")
    return _ENV.get_template("report.html").render(
        # Our own constants, not user text: escaping would break the policy and the CSS.
        csp=markupsafe.Markup(CSP),
        style=markupsafe.Markup(STYLE),
        title=f"convae report: {Path(run_dir).name}",
        run_dir=str(run_dir),
        data_name=name,
        n_images=len(ctx.data.images),
        made=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        version=__version__,
        device=str(next(ctx.model.parameters()).device),
        precision=ctx.precision,
        seconds=seconds,
        notices=_notices(ctx, name),
        sections=sections,
        fmt=fmt,
    )


def _sections(ctx: ViewContext, config, progress: bool) -> list[Section]:
    """The model card, then every view in REGISTRY order; a view that does not apply says why."""
    plan = [CARD] + [(v.name, v.title, v.about) for v in REGISTRY.values()]
    sections = []
    with progress_bar(progress, len(plan), desc="report", unit="section") as bar:
        for sid, title, what in plan:
            bar.set_postfix_str(sid, refresh=True)
            section = Section(sid, title, what)
            t0 = time.perf_counter()
            try:
                if sid == "card":
                    section.card = model_card(ctx.model, config, ctx)
                else:
                    section.shown = draw(sid, ctx)
                    section.png = base64.b64encode(figure_png(section.shown.figure)).decode("ascii")
            except ViewNotApplicable as e:
                section.skipped = str(e)
            section.seconds = time.perf_counter() - t0
            sections.append(section)
            bar.update(1)
    return sections


def _notices(ctx: ViewContext, name: str) -> list[str]:
    out = []
    if ctx.data.labels is None:
        out.append(
            f"{name} has no labels: the embedding is not coloured by class, and probe accuracy needs "
            "labelled data (see its section)."
        )
    if not ctx.model.spatial:
        out.append(
            "This model's layers are vectors (a dense autoencoder flattens the image), so it has no feature maps "
            "and no receptive fields that grow; those sections say so, and its first layer is shown as "
            "whole-image templates."
        )
    n_sample = len(ctx.sample()[0])
    if n_sample < len(ctx.data.images):
        out.append(
            f"Patches, channel choice, the embedding and the reconstruction metrics use {n_sample} of "
            f"the {len(ctx.data.images)} images (sampled with seed {ctx.seed})."
        )
    return out


def write_report(run_dir: str | Path, data, output: str | Path, **options) -> ReportResult:
    """Build the report (see :func:`build_report`) and write it atomically to `output` (.html).

    Examples
    --------
    >>> write_report("runs/mnist", convae.load_dataset("mnist", "test"), "report.html")  # doctest: +SKIP
    """
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--output {output}: name the report .html")
    page, sections, seconds = build_report(run_dir, data, **options)
    atomic_write_text(output, page)
    return ReportResult(
        path=output,
        seconds=seconds,
        sections=[s.title for s in sections],
        skipped={s.title: s.skipped for s in sections if s.skipped},
    )
