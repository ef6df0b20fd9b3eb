"""`convae` command line: parses arguments, calls the library, prints results.

Option choices and defaults come from the library's config types; the library loads on first
use (``convae.X``), so ``convae --help`` imports no torch. Every error a user can cause, click's
own usage errors included, ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import tempfile
import typing
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

import convae

from . import outputs
from ._memory import keep_freed_memory
from .analysis.options import METRICS, NEIGHBOR_BASELINES, SCORES, ScoreOptions
from .config import NAN_POLICIES, TrainConfig
from .errors import ConvaeError
from .features.plan import COMPILE_MODES, POOLS, PRECISIONS
from .limits import FIGURE_ITEMS_MAX, NPROC_MAX, SEED_MAX, VIEW_STEPS_MAX
from .models.config import Activation, Bottleneck, Decoder, Downsample, Norm, Upsample
from .models.registry import ARCHITECTURES
from .presets import PRESETS
from .probe.options import (
    AUGMENTATIONS,
    BASELINES,
    CLASSIFIER_NAMES,
    FEATURE_DTYPES,
    NORMALIZATIONS,
    WHITEN_BLOCK_COLUMNS,
    ProbeOptions,
)
from .views import VIEWS

_PRESET_NAMES = ", ".join(PRESETS)

_COMPILE_HELP = (
    "The forward pass through torch.compile, which fuses the work between the products "
    "(the presets' models 1.0-2.0x as fast on a 2-core CPU, after 1-20 s of compiling): "
    "auto: for 10,000 images or more; always; never."
)


def _choice(literal) -> click.Choice:
    return click.Choice(typing.get_args(literal))


def _train_choice(field: str) -> click.Choice:
    return _choice(typing.get_type_hints(TrainConfig)[field])


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _fail(e.format_message())
        except ConvaeError as e:
            _fail(str(e))
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            name = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{name}{e.strerror or e}")
        except OSError as e:  # a full disk, an I/O error
            _fail(f"{getattr(e, 'filename', '') or ''}{': ' if getattr(e, 'filename', None) else ''}{e.strerror or e}")
        except MemoryError as e:  # numpy's _ArrayMemoryError among them
            _fail(_out_of_memory(e))
        except RuntimeError as e:
            if not _is_allocator_failure(e):
                raise
            _fail(_out_of_memory(e))
        except KeyboardInterrupt as e:
            detail = " ".join(str(e).split())  # fit says where its checkpoint is
            click.echo(
                f"convae: interrupted; {detail}"
                if detail
                else "convae: interrupted; `convae fit ... --resume` continues a run, "
                "and the same `convae extract` command resumes an extraction",
                err=True,
            )
            sys.exit(128 + getattr(e, "signum", 2))  # 130 for Ctrl-C, 143 for SIGTERM


#: How torch's allocators word a failed allocation (CPU, CUDA, MPS, oneDNN).
_ALLOCATOR_MESSAGES = ("not enough memory", "defaultcpuallocator", "out of memory", "can't allocate memory")


def _is_allocator_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or any(m in text for m in _ALLOCATOR_MESSAGES)


def _out_of_memory(e: BaseException) -> str:
    """One line for an allocation that failed anywhere in a command, whatever allocator said so."""
    detail = " ".join(str(e).split())[:160]
    return (
        f"out of memory ({detail or type(e).__name__}); use a smaller --batch-size, --widths or "
        "--image-size, or fewer images"
    )


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 0x7F)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def _line(text: object) -> str:
    """`text` as one line: a control character (a newline in a file name above all) is shown
    escaped, so no name can start a line of its own, such as a forged `convae: error:`."""
    return str(text).translate(_CONTROL)


def _fail(message: str) -> None:
    click.echo(f"convae: error: {_line(message.strip()) or 'failed'}", err=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"convae: warning: {_line(message)}", err=True)


def _ints(value: str | None, option: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConvaeError(f"{option} {value!r}: expected integers separated by commas, e.g. 32,64,128") from None
    if not out:
        raise ConvaeError(f"{option}: give at least one integer")
    return out


def _picks(value: str | None) -> list[int | str] | None:
    """--index: row numbers, or files of a folder by path ("0,5" or "cats/a.jpg,dogs/b.jpg")."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConvaeError("--index: give at least one image, e.g. 0,5 or cats/a.jpg")
    return [int(v) if v.lstrip("-").isdigit() else v for v in items]


def _image_size(value: str | None):
    sizes = _ints(value.lower().replace("x", ",") if value else value, "--image-size")
    if sizes is None:
        return None
    if len(sizes) == 1:
        return (sizes[0], sizes[0])
    if len(sizes) == 2:
        return sizes
    raise ConvaeError(f"--image-size {value!r}: give one size (28) or HxW (37x53)")


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv less `name VALUE` / `name=VALUE`: what torchrun's workers are given."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0].keys())
    cells = [[str(k) for k in keys]] + [[_fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:  # a column that does not apply to the row (a k-NN's iterations)
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 1000:
        return f"{value:,}"
    return _line(value)  # a cell naming a file stays on its row


def _claim(outs, *inputs, option: str = "--output") -> None:
    """Check the outputs against the command's inputs and run files, before any work, and lock
    them until the command ends (click closes the context's resources, on errors too)."""
    claim = outputs.claim_outputs(outs, outputs.input_paths(*inputs), option)
    click.get_current_context().with_resource(claim)


def _given(names) -> set[str]:
    """Which of these parameters the command line set (not their defaults)."""
    ctx = click.get_current_context()
    return {k for k in names if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}


data_options = [
    click.option("--data-dir", type=click.Path(path_type=Path), help="Where built-in datasets are looked up (then $CONVAE_DATA, ~/.cache/convae)."),
    click.option("--split", help="Split of a built-in dataset: train or test (or DATA:split)."),
    click.option("--image-size", help="Resize and centre-crop folder images to this size: 28 or HxW."),
    click.option("--channels", type=int, help="Image channels for folder images: 1 (grayscale) or 3 (RGB)."),
    click.option("--no-download", is_flag=True, help="Never download a missing built-in dataset."),
]  # fmt: skip


def with_data_options(f):
    for option in reversed(data_options):
        f = option(f)
    return f


def _load(data, data_dir, split, image_size, channels, no_download, quiet=True):
    return convae.load_dataset(
        data,
        split,
        data_dir=data_dir,
        image_size=_image_size(image_size),
        channels=channels,
        download=not no_download,
        progress=not quiet,
    )


def _load_for_run(run_dir, data, data_dir, split, image_size, channels, no_download, quiet):
    """DATA at the run's image size and channels (unless given)."""
    m = convae.load_config(run_dir).model
    h, w = m.image_size
    chans = channels or (m.in_channels if m.in_channels in (1, 3) else None)
    return _load(data, data_dir, split, image_size or f"{h}x{w}", chans, no_download, quiet)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="convae")
def main():
    """convae: hierarchical image features without labels, from convolutional autoencoders."""
    warnings.showwarning = _show_warning


@main.command()
@click.argument("data")
@click.option("--out", "-o", "out", type=click.Path(path_type=Path), required=True, help="Run directory to create.")
@with_data_options
@click.option(
    "--arch",
    type=click.Choice(list(ARCHITECTURES)),
    default="conv",
    show_default=True,
    help="conv: ConvAE; dense: the fully-connected baseline; sparse: one wide convolution over contrast-normalized, whitened patches, trained as a k-sparse autoencoder (--widths 1600 filters, --kernel-size 5 patches by default); hsparse: stages of such patch coders, each over the pooled, PCA-reduced output of the one below, trained greedily (--widths gives each stage's filters, e.g. 1600,1600).",
)
@click.option("--widths", help="Channels per encoder stage, e.g. 32,64,128 (default: from the image size).")
@click.option("--convs-per-stage", type=int, help="Conv layers per stage.")
@click.option("--kernel-size", type=int, help="Conv kernel size (odd).")
@click.option("--norm", type=_choice(Norm))
@click.option("--activation", type=_choice(Activation))
@click.option("--downsample", type=_choice(Downsample), help="Stage downsampling (default max pooling).")
@click.option("--upsample", type=_choice(Upsample), help="Decoder upsampling.")
@click.option(
    "--decoder",
    type=_choice(Decoder),
    help="mirror: decoder stages upsample, then convolve; light: they convolve first, at a quarter of the pixels (faster training).",
)
@click.option("--bottleneck", type=_choice(Bottleneck), help="conv: feature maps; dense: a latent vector.")
@click.option("--latent-channels", type=int, help="conv bottleneck: 1x1 conv to this many channels (0: none).")
@click.option("--latent-dim", type=int, help="Code size of a dense bottleneck or of --arch dense.")
@click.option(
    "--code-wta",
    type=float,
    help="Winner-take-all sparsity of the code while reconstructing: each map keeps its peak, each channel its top fraction of the batch (e.g. 0.2; 0: off).",
)
@click.option("--hidden", help="--arch dense: hidden widths, e.g. 512,256.")
@click.option(
    "--sparse-k",
    type=int,
    help="--arch sparse: filters kept per patch when reconstructing it (default 1: gradient-descent k-means).",
)
@click.option(
    "--patches-per-image",
    type=int,
    help="--arch sparse: random patches each training image gives per step (default 16).",
)
@click.option(
    "--whiten-eps", type=float, help="--arch sparse, hsparse: eigenvalue floor of the patch whitening (default 0.1)."
)
@click.option(
    "--upper-kernel",
    type=int,
    help="--arch hsparse: patch side of the stages above the first, in positions of the pooled map below (default 3).",
)
@click.option(
    "--pool-size", type=int, help="--arch hsparse: q x q average pooling between stages, stride q (default 2)."
)
@click.option(
    "--reduce-dim",
    type=int,
    help="--arch hsparse: each location's values after PCA between stages (default 128; 0: none).",
)
@click.option(
    "--split-threshold", type=float, help="--arch hsparse: the soft threshold of the stages' sign split (default 0.25)."
)
@click.option(
    "--groups",
    type=int,
    help="--arch hsparse: the stages above the first code this many receptive-field groups of co-varying channels of the map below, each with its own filters (default 0: PCA-reduced maps instead).",
)
@click.option("--group-size", type=int, help="--arch hsparse with --groups: channels in a group (default 32).")
@click.option(
    "--upper-image-fraction",
    type=float,
    help="--arch hsparse: the fraction of each batch's images the stages above the first train on (default 1; "
    "less is faster: their steps run stage 1 over whole images).",
)
@click.option("--epochs", type=int, default=TrainConfig.epochs, help="Epochs (default: from the dataset size).")
@click.option("--max-time", type=float, default=TrainConfig.max_time, help="Wall-clock training budget in seconds.")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option("--schedule", type=_train_choice("schedule"), default=TrainConfig.schedule, show_default=True)
@click.option("--loss", type=_train_choice("loss"), default=TrainConfig.loss, show_default=True)
@click.option("--noise", type=float, default=TrainConfig.noise, help="Denoising: std of gaussian input noise.")
@click.option(
    "--mask-ratio", type=float, default=TrainConfig.mask_ratio, help="Masking: fraction of input patches hidden."
)
@click.option("--val-fraction", type=float, default=TrainConfig.val_fraction, show_default=True)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True)
@click.option("--device", default=TrainConfig.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=int, default=TrainConfig.threads, help="CPU threads (default: torch's).")
@click.option(
    "--amp/--no-amp",
    default=TrainConfig.amp,
    show_default=True,
    help="bf16 mixed precision where the device computes bf16 natively (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 or AMX); fp32 elsewhere or with --no-amp.",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option(
    "--force",
    is_flag=True,
    help="Write the run into an existing folder of other files (never replacing or removing them); without it such a folder is refused.",
)
@click.option(
    "--on-nan",
    type=click.Choice(NAN_POLICIES),
    help="A loss that turns NaN or infinite: stop (the default; keeping the last good checkpoint), skip the step, or go back to the epoch's start with half the learning rate. With --resume: the run's saved policy unless given.",
)
@click.option(
    "--nproc",
    type=click.IntRange(1, NPROC_MAX),
    default=1,
    show_default=True,
    help="Train with N processes (torchrun + DDP); --batch-size and --lr are per process.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--preset", help=f"Recommended settings for a dataset ({_PRESET_NAMES}); options given override them.")
def fit(
    data,
    out,
    data_dir,
    split,
    image_size,
    channels,
    no_download,
    hidden,
    quiet,
    resume,
    force,
    nproc,
    preset,
    on_nan,
    **settings,
):
    """Train an autoencoder on DATA and write the run directory --out.

    DATA: digits, mnist, fashion-mnist, cifar10 (optionally :train / :test),
    a folder of images, or a .npy/.npz file.
    """
    if nproc > 1 and not convae.distributed.env_info().enabled:
        sys.exit(convae.distributed.launch(nproc, _without_option(sys.argv[1:], "--nproc")))
    keep_freed_memory(all_sizes=True)  # this process only trains
    if preset:
        settings = convae.presets.fit_settings(preset, settings, _given(settings))
    dataset = _load(data, data_dir, split, image_size, channels, no_download, quiet)
    h, w = dataset.images.shape[1:3]
    if min(h, w) < 2:
        raise ConvaeError(
            f"{dataset.name}: images are {h}x{w} pixels, too small to train on: resize them with --image-size (e.g. 28)"
        )
    settings["channels"] = _ints(settings.pop("widths"), "--widths")
    settings["hidden"] = _ints(hidden, "--hidden")
    est = convae.ConvAutoencoder(verbose=not quiet, **settings)
    est.fit(dataset.images, run_dir=out, data_spec=dataset.name, resume=resume, on_nan=on_nan, force=force)
    convae.distributed.shutdown()
    if not convae.distributed.env_info().is_main:
        return
    last = est.history_[-1]
    click.echo(
        _line(
            f"trained {len(est.history_)} epoch(s) on {dataset.name} ({len(dataset)} images): "
            f"val MSE {last['val_mse']:.5f}, PSNR {last['val_psnr']:.2f} dB, SSIM {last['val_ssim']:.4f}"
        )
    )
    click.echo(_line(f"run directory: {out}"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def info(run_dir):
    """Layers of a trained model: output shape, channels, stride, receptive field, parameters."""
    model, config = convae.load_model(run_dir)
    m = config.model
    click.echo(
        _line(
            f"{run_dir}: arch={m.arch}, input {m.image_size[0]}x{m.image_size[1]}x{m.in_channels}, "
            f"code size {convae.models.code_size(m)}, trained on {config.data.spec or 'an array'} "
            f"({config.data.num_images} images), convae {config.convae_version}"
        )
    )
    click.echo(_table(model.describe()))
    history = convae.run.read_history(run_dir)
    if history:
        last = {"val_psnr": float("nan"), "val_ssim": float("nan"), **history[-1]}  # older runs: fewer columns
        click.echo(
            f"epochs {int(last['epoch'])}: val MSE {last['val_mse']:.5f}, PSNR {last['val_psnr']:.2f} dB, "
            f"SSIM {last['val_ssim']:.4f}"
        )


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@with_data_options
@click.option(
    "--count", "-n", type=click.IntRange(1, FIGURE_ITEMS_MAX), default=16, show_default=True, help="Images to show."
)
def reconstruct(run_dir, data, output, data_dir, split, image_size, channels, no_download, count):
    """Originals above reconstructions, with MSE and PSNR, as a PNG grid."""
    _claim([output], run_dir, data)
    est = convae.ConvAutoencoder.load(run_dir)
    h, w, c = est.image_shape_
    dataset = _load(data, data_dir, split, image_size or f"{h}x{w}", channels or c, no_download)
    images = dataset.images[: min(count, len(dataset))]
    if images.shape[1:] != est.image_shape_:
        raise ConvaeError(
            f"{data}: images are {'x'.join(map(str, images.shape[1:]))} but {run_dir} was trained on "
            f"{h}x{w}x{c}; pass --image-size/--channels"
        )
    fig = convae.views.reconstruction_figure(images, est.reconstruct(images), dataset.name)
    convae.views.save_figure(fig, output)
    click.echo(_line(f"wrote {output}"))


view_options = [
    click.option("--probe", "probe_path", type=click.Path(path_type=Path), help="results.json written by `convae probe`."),
    click.option("--max-images", type=click.IntRange(min=1), default=3000, show_default=True, help="Images (sampled with --seed) for patches, channel choice and the embedding."),
    click.option("--top-channels", type=click.IntRange(1, FIGURE_ITEMS_MAX), default=8, show_default=True, help="Channels shown per layer (the most variable ones)."),
    click.option("--top-k", type=click.IntRange(1, FIGURE_ITEMS_MAX), default=8, show_default=True, help="Patches per channel."),
    click.option("--steps", type=click.IntRange(1, VIEW_STEPS_MAX), default=128, show_default=True, help="Gradient steps of activation maximization."),
    click.option("--seed", type=click.IntRange(0, SEED_MAX), default=0, show_default=True, help="Seed of the image sample, t-SNE and activation maximization (0 to 2**32-1: numpy's range)."),
    click.option("--device", default="cpu", show_default=True, help="cpu, auto, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="auto: the hierarchical models' products in bf16 where the device computes it natively, as `extract` does; float32: every product fp32."),
    click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
]  # fmt: skip


def with_view_options(f):
    for option in reversed(view_options):
        f = option(f)
    return f


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data", required=False)
@click.option("--view", "view", required=True, help=f"{', '.join(VIEWS)}.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="PNG file to write.")
@with_data_options
@click.option(
    "--layers",
    help="Encoder layers for maps/patches/maximize, comma-separated, or all; a block's sign-split maps too, e.g. stage1.conv1.split (see `convae layers`).",
)
@click.option(
    "--index",
    help="Images to show (maps, recon, receptive; interpolate: two), e.g. 0,5,9, or files of a folder by path: cats/a.jpg,dogs/b.jpg.",
)
@click.option(
    "--count",
    "-n",
    type=click.IntRange(1, FIGURE_ITEMS_MAX),
    default=8,
    show_default=True,
    help="Images for recon (maps: up to 3).",
)
@with_view_options
def show(
    run_dir,
    data,
    view,
    output,
    data_dir,
    split,
    image_size,
    channels,
    no_download,
    layers,
    index,
    count,
    probe_path,
    max_images,
    top_channels,
    top_k,
    steps,
    seed,
    device,
    precision,
    quiet,
):
    """Render one view of a trained model as a PNG.

    DATA (as for `fit`) is needed by maps, patches, recon and embedding; receptive and
    maximize use it when given. Views: curves (history.csv), recon (reconstructions and error),
    outliers (the --count worst reconstructed images, with per-pixel error maps), filters (first
    layer), receptive (receptive-field growth), maps (feature maps by depth), patches
    (top-activating patches cropped to each unit's receptive field), maximize (activation
    maximization), embedding (PCA and t-SNE of the bottleneck), interpolate (--count points
    between the codes of two images, --index A,B, beside their pixel blend), probe (--probe).
    """
    if output.suffix.lower() != ".png":
        raise ConvaeError(f"--output {output}: views are written as PNG; name it .png")
    _claim([output], run_dir, data, probe_path)
    model, _ = convae.load_model(run_dir, device=convae.tensors.resolve_device(device))
    probe_rows = convae.views.load_probe_results(probe_path) if probe_path else None
    dataset = _load_for_run(run_dir, data, data_dir, split, image_size, channels, no_download, quiet) if data else None
    fig = convae.render_view(
        view,
        model,
        data=dataset,
        history=convae.run.read_history(run_dir),
        probe_rows=probe_rows,
        layers=layers,
        channels=top_channels,
        top_k=top_k,
        count=count,
        indices=_picks(index),
        max_images=max_images,
        steps=steps,
        seed=seed,
        precision=precision,
        progress=not quiet,
    )
    convae.views.save_figure(fig, output)
    click.echo(_line(f"wrote {output}"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="HTML file to write.")
@with_data_options
@click.option(
    "--tsne-points",
    type=click.IntRange(min=1),
    default=2000,
    show_default=True,
    help="At most this many points for t-SNE.",
)
@with_view_options
def report(
    run_dir,
    data,
    output,
    data_dir,
    split,
    image_size,
    channels,
    no_download,
    tsne_points,
    probe_path,
    max_images,
    top_channels,
    top_k,
    steps,
    seed,
    device,
    precision,
    quiet,
):
    """A self-contained HTML report: model card and every view, images inline, nothing fetched.

    DATA (as for `fit`, e.g. mnist:test) is what the views are computed on; without labels the
    label-based parts are skipped and the report says so. --probe adds probe accuracy by layer.
    """
    _claim([output], run_dir, data, probe_path)
    dataset = _load_for_run(run_dir, data, data_dir, split, image_size, channels, no_download, quiet)
    result = convae.write_report(
        run_dir,
        dataset,
        output,
        probe=probe_path,
        max_images=max_images,
        tsne_points=tsne_points,
        channels=top_channels,
        top_k=top_k,
        maximize_steps=steps,
        seed=seed,
        device=device,
        precision=precision,
        progress=not quiet,
    )
    missing = f", {len(result.skipped)} not shown: {', '.join(result.skipped)}" if result.skipped else ""
    click.echo(_line(f"wrote {result.path} ({len(result.sections)} sections{missing}) in {result.seconds:.1f} s"))


@main.command("layers")
@click.argument("run_dir", type=click.Path(path_type=Path))
def layers_command(run_dir):
    """Encoder layers `extract` and `probe` accept: channels, stride, receptive field, size per pooling.

    The last columns give the feature size of each --pool: flatten keeps the maps, avg and max
    give one value per channel, grid2/grid4 average over a 2x2/4x4 grid of regions.
    """
    model, _ = convae.load_model(run_dir)
    click.echo(_table(convae.features.layer_table(model)))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="OUT.npy (labels go to OUT.labels.npy), OUT.npz or OUT.parquet; each row's source goes to OUT.index.csv (Parquet: its first columns).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["npy", "npz", "parquet"]),  # features.FORMATS (named here: --help loads no torch)
    help="npy, npz or parquet (one file: index, path, label, class, then a column per feature). Default: from OUT's suffix.",
)
@with_data_options
@click.option(
    "--layers",
    default="bottleneck",
    show_default=True,
    help="Encoder layers, comma-separated, or all (see `convae layers`).",
)
@click.option(
    "--pool",
    default="flatten",
    show_default=True,
    help=f"{', '.join(POOLS)}; several, comma-separated, are concatenated.",
)
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: the hierarchical models' products in bf16 where the CPU or GPU computes it natively (about 1.3x faster, features within 1% of a standard deviation of fp32's); float32: the same features on every machine.",
)
@click.option("--compile", type=click.Choice(COMPILE_MODES), default="auto", show_default=True, help=_COMPILE_HELP)
@click.option(
    "--batch-size", type=int, help="Images per forward pass (default: sized to the model's largest map, at most 256)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(
    run_dir,
    data,
    output,
    fmt,
    data_dir,
    split,
    image_size,
    channels,
    no_download,
    layers,
    pool,
    dtype,
    precision,
    compile,
    batch_size,
    device,
    quiet,
):
    """Encoder features of DATA, one row per image, into OUT.npy, OUT.npz or OUT.parquet.

    The pooled features of the requested layers are concatenated in network order. Each row's
    source (its index in the split; for a folder its path, class and label) goes to
    OUT.index.csv, or into the Parquet file. Rows are written batch by batch, so memory stays
    flat; run the same command again after an interruption and it resumes where it stopped.
    """
    output = _with_format(output, fmt)
    dist = convae.distributed.env_info()  # under torchrun: this rank's shard of the images
    model, _ = convae.load_model(run_dir)
    device = convae.distributed.process_device(convae.tensors.resolve_device(device), dist)
    extractor = convae.FeatureExtractor(
        model, layers, pool, device=device, batch_size=batch_size, precision=precision, compile=compile
    )
    h, w, c = extractor.image_shape
    channels = channels or (c if c in (1, 3) else None)  # the run's, where the loader can convert to it
    dataset = _load(data, data_dir, split, image_size or f"{h}x{w}", channels, no_download, quiet)
    images, labels, index = dataset.images, dataset.labels, dataset.source_index()
    if dist.enabled:
        images, labels = convae.features.shard_images(images, labels, dist.rank, dist.world_size)
        index = index.take(slice(*convae.features.shard_range(len(index), dist.rank, dist.world_size)))
        output = convae.features.shard_path(output, dist.rank, dist.world_size)
    outputs.check_outputs(_extract_files(output), outputs.input_paths(run_dir, data))  # locked by extract_to_file
    result = convae.extract_to_file(
        extractor,
        images,
        output,
        labels=labels,
        index=index,
        dtype=dtype,
        source=dataset.name,
        progress=not quiet and dist.is_main,
    )
    resumed = f"; resumed at image {result.resumed_from:,}" if result.resumed_from else ""
    blocks = ", ".join(b.name for b in extractor.blocks)
    click.echo(_line(f"wrote {result.path}: {result.shape[0]:,} x {result.shape[1]:,} {dtype} ({blocks}){resumed}"))
    if result.labels_path is not None:
        click.echo(_line(f"labels: {result.labels_path}"))
    if result.index_path is not None:
        click.echo(_line(f"index: {result.index_path}"))


def _extract_files(output: Path) -> list[Path]:
    """OUT and the files written beside it (labels, index, the unfinished extraction)."""
    stem = output.with_name(output.name[: -len(output.suffix)] if output.suffix else output.name)
    side = [stem.with_name(stem.name + ".labels.npy"), convae.features.index_path_of(output)]
    return [output, *side, *convae.features.partial_paths(output)]


def _with_format(output: Path, fmt: str | None) -> Path:
    """OUT with the suffix --format asks for (added when OUT has none); a conflicting suffix is an error."""
    suffix = output.suffix.lower().lstrip(".")
    if fmt is None:
        return output
    if suffix in ("npy", "npz", "parquet") and suffix != fmt:
        raise ConvaeError(f"--format {fmt}: --output {output} says .{suffix}; name it .{fmt}")
    return output if suffix == fmt else output.with_name(output.name + "." + fmt)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--train", "train_data", help="Labelled data the classifiers are fitted on, e.g. mnist:train.")
@click.option("--test", "test_data", help="Labelled data they are scored on, e.g. mnist:test.")
@click.option(
    "--data",
    "one_data",
    help="One labelled dataset instead of --train/--test, split by --test-fraction or --cv, e.g. a folder of class subfolders.",
)
@click.option(
    "--test-fraction",
    type=float,
    help="With --data: score on a stratified hold-out of this fraction (seeded by --split-seed), fit on the rest.",
)
@click.option(
    "--cv",
    type=int,
    help="With --data: stratified K-fold cross-validation; every row gives the mean over the folds and their standard deviation.",
)
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the --test-fraction / --cv split.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="results.json; a Markdown copy goes beside it.",
)
@click.option(
    "--layers",
    help="Encoder layers, comma-separated, or all (default: every stage and the bottleneck; see `convae layers`); join layers with + to probe their features concatenated, e.g. stage2+bottleneck.",
)
@click.option(
    "--pool", help=f"{', '.join(POOLS)}; several, comma-separated, each get rows (default: {ProbeOptions.pool})."
)
@click.option(
    "--preset",
    help=f"The layers, pooling, normalization, augmentation and classifier settings a dataset's preset is probed with ({_PRESET_NAMES}); --layers, --pool, --normalize, --whiten-block-columns, --augment, --c-scale and --max-iter override them.",
)
@click.option(
    "--classifiers",
    default=",".join(ProbeOptions.classifiers),
    show_default=True,
    help=f"Any of {', '.join(CLASSIFIER_NAMES)}, comma-separated.",
)
@click.option(
    "--baselines",
    default=",".join(BASELINES),
    show_default=True,
    help="Any of pixels, pca, random (untrained weights, batch-norm statistics from the train images), or none.",
)
@click.option(
    "--compare",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Another run directory to probe alongside (repeatable).",
)
@click.option(
    "--labels-per-class", default="all", show_default=True, help="e.g. 10,100,1000,all: accuracy with few labels."
)
@click.option(
    "--seeds",
    type=int,
    default=ProbeOptions.seeds,
    show_default=True,
    help="Label subsets averaged for each labels-per-class below all.",
)
@click.option(
    "--normalize",
    help=f"Features before each classifier ({', '.join(NORMALIZATIONS)}): standard (StandardScaler); whiten (standardized, then PCA-whitened with a variance floor, for the rows fitted on all labels; it lifted logistic regression on MNIST's preset features and lowered Fashion-MNIST's and CIFAR-10's); whiten-layers (each layer's features of a joined set, e.g. stage1+stage2, whitened on their own: cheaper in time and memory); whiten-blocks (each layer's features in blocks of at most --whiten-block-columns, each whitened on its own: cheaper still). Default: the --preset's, else standard.",
)
@click.option(
    "--whiten-block-columns",
    type=int,
    help=f"With --normalize whiten-blocks: the most columns a block whitened on its own (each keeps a float32 factor of its width squared for the fit). Default: the --preset's, else {WHITEN_BLOCK_COLUMNS}.",
)
@click.option(
    "--augment",
    type=click.Choice(AUGMENTATIONS),
    help="flip: the classifiers also fit every train image mirrored left to right, with its label (twice the train features; baselines alike; test images unchanged). flip-tta: that, and each test image is scored by the mean of the classifier's scores for it and its mirror image. Default: the --preset's, else none.",
)
@click.option(
    "--c-scale",
    type=float,
    help="Multiplies the C of logreg (64/dim), linsvm (8/dim) and rbfsvm (10): above 1, less regularization. Default: the --preset's, else 1.",
)
@click.option(
    "--max-iter",
    type=int,
    help="Iteration cap of logreg, linsvm and mlp (default: the --preset's, else 300, 1000 and 300).",
)
@click.option(
    "--precondition/--no-precondition",
    default=None,
    help="logreg and linsvm take their L-BFGS steps in the coordinates of a whitening of blocks of columns: the same solution in fewer passes where the features are wide and correlated (default: the --preset's, else off).",
)
@click.option(
    "--dtype",
    type=click.Choice(FEATURE_DTYPES),
    help="How the probe holds the features in memory: float16 halves it; uint8 halves it again, each column in 8-bit codes of its range on 1,024 train images (default: the --preset's, else float32).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="auto: the hierarchical models' products (and the whitening's covariance) in bf16 where the CPU or GPU computes it natively, about 1.3x faster; float32: fp32 throughout, the same features on every machine (default: auto).",
)
@click.option(
    "--compile",
    type=click.Choice(COMPILE_MODES),
    help=_COMPILE_HELP + " (default: auto)",
)
@click.option(
    "--pca-dim",
    help="PCA baseline sizes, e.g. 64,128 (default: the compared features' sizes below the pixel count, else 95% of the variance).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Where built-in datasets are looked up (then $CONVAE_DATA, ~/.cache/convae).",
)
@click.option("--image-size", help="Resize and centre-crop images to this size (default: the run's).")
@click.option("--channels", type=int, help="Image channels: 1 or 3 (default: the run's).")
@click.option("--no-download", is_flag=True, help="Never download a missing built-in dataset.")
@click.option(
    "--batch-size", type=int, help="Images per forward pass (default: sized to the model's largest map, at most 256)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def probe(
    run_dir,
    train_data,
    test_data,
    one_data,
    output,
    preset,
    compare,
    pca_dim,
    data_dir,
    image_size,
    channels,
    no_download,
    batch_size,
    device,
    quiet,
    **given,
):
    """How good the features are: classifiers on each layer's features, beside baselines.

    Fits StandardScaler (or --normalize whiten) + classifier on the --train features of each
    layer and pooling and reports --test accuracy and macro-F1, with the same classifier on raw
    pixels, on PCA of the pixels, on the same architecture with random weights and on any
    --compare run. With one labelled dataset, --data DATA --test-fraction 0.2 (a stratified
    hold-out) or --data DATA --cv 5 (stratified folds, mean and standard deviation) instead.
    """
    if not str(output).lower().endswith(".json"):
        raise ConvaeError(f"--output {output}: name it .json (a Markdown copy is written beside it)")
    _check_probe_data(train_data, test_data, one_data, given)
    _claim([output, output.with_suffix(".md")], run_dir, train_data, test_data, one_data, compare)
    options = ProbeOptions.with_preset(preset, **given, pca_dims=_ints(pca_dim, "--pca-dim"))  # checked: no data yet
    if one_data is not None:
        data, _ = _probe_data(run_dir, one_data, None, options, data_dir, image_size, channels, no_download, quiet)
        rows = convae.probe.run_probe_on(
            run_dir, data, options, compare=compare, device=device, batch_size=batch_size, progress=not quiet
        )
        names = dict(data=data.name)
    elif convae.features.is_feature_file(train_data) and convae.features.is_feature_file(test_data):
        rows = convae.probe.probe_feature_files(train_data, test_data, options)
        if options.baselines:
            click.echo("note: baselines need images, so precomputed features are probed alone", err=True)
        if options.augment != "none":
            click.echo("note: --augment needs images, so precomputed features are probed as they are", err=True)
        names = dict(train=str(train_data), test=str(test_data))
    else:
        train, test = _probe_data(
            run_dir, train_data, test_data, options, data_dir, image_size, channels, no_download, quiet
        )
        rows = convae.run_probe(
            run_dir, train, test, options, compare=compare, device=device, batch_size=batch_size, progress=not quiet
        )
        names = dict(train=train.name, test=test.name)
    json_path, md_path = convae.probe.write_results(rows, output, run=str(run_dir), **names, **options.fit_meta())
    click.echo(_table(rows))
    click.echo(_line(f"wrote {json_path} and {md_path}"))


def _check_probe_data(train_data, test_data, one_data, given) -> None:
    """Either --train and --test, or --data with --test-fraction or --cv."""
    split = given.get("test_fraction") is not None or given.get("cv") is not None
    if one_data is not None:
        if train_data is not None or test_data is not None:
            raise ConvaeError("--data splits one dataset: give it without --train/--test")
        if not split:
            raise ConvaeError("--data needs --test-fraction (e.g. 0.2) or --cv (e.g. 5) to split it")
        return
    if split:
        raise ConvaeError("--test-fraction and --cv split one dataset: give it as --data")
    if train_data is None or test_data is None:
        raise ConvaeError("give --train and --test, or one labelled dataset as --data with --test-fraction or --cv")


def _probe_data(run_dir, train_data, test_data, options, data_dir, image_size, channels, no_download, quiet):
    """The probe's train and test images at the run's size (test None: not given), after its
    layers are checked against the run."""
    convae.probe.check_layers(run_dir, options)  # so is an unknown layer, before any data is loaded
    m = convae.load_config(run_dir).model
    h, w = m.image_size
    size, chans = image_size or f"{h}x{w}", channels or (m.in_channels if m.in_channels in (1, 3) else None)
    return (
        _load(train_data, data_dir, None, size, chans, no_download, quiet),
        None if test_data is None else _load(test_data, data_dir, None, size, chans, no_download, quiet),
    )


compute_options = [
    click.option("--batch-size", type=int, help="Images per forward pass (default: sized to the model's largest map, at most 256)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                 help="auto: the hierarchical models' products in bf16 where the CPU or GPU computes it natively; float32: the same results on every machine."),
    click.option("--compile", type=click.Choice(COMPILE_MODES), default="auto", show_default=True, help=_COMPILE_HELP),
    click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
]  # fmt: skip


def with_compute_options(f):
    for option in reversed(compute_options):
        f = option(f)
    return f


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("data")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="scores.csv to write.")
@with_data_options
@click.option(
    "--train",
    "train_data",
    help="The training images the k-NN distance is measured to and thresholds are taken from (default: the data the run was trained on, as its config.json names it); none: reconstruction scores only.",
)
@click.option(
    "--layers",
    help="Features of the k-NN distance: encoder layers (see `convae layers`). Default: the middle depth (stage2 of the default ConvAE).",
)
@click.option("--pool", default=ScoreOptions.pool, show_default=True, help=f"Their pooling: {', '.join(POOLS)}.")
@click.option(
    "--k",
    type=int,
    default=ScoreOptions.k,
    show_default=True,
    help="Nearest training images the distance is averaged over.",
)
@click.option("--metric", type=click.Choice(METRICS), default=ScoreOptions.metric, show_default=True)
@click.option(
    "--by",
    type=click.Choice(SCORES),
    default=ScoreOptions.by,
    show_default=True,
    help="The score rows are sorted by, worst first, and flagged on.",
)
@click.option(
    "--threshold-quantile",
    type=float,
    help="Flag the images whose --by score is above this quantile of the training images' own scores, e.g. 0.99.",
)
@click.option(
    "--calibration-images",
    type=int,
    default=ScoreOptions.calibration_images,
    show_default=True,
    help="Training images (evenly spaced) whose own scores give the thresholds.",
)
@with_compute_options
def score(run_dir, data, output, data_dir, split, image_size, channels, no_download, train_data, batch_size, device, quiet, **given):  # fmt: skip
    """Anomaly scores of every image of DATA: reconstruction MSE, 1 - SSIM, and the mean distance
    to the k nearest training images in feature space, as CSV, worst first, each row with its
    index, path, label and class.
    """
    options = ScoreOptions(**given)  # checked before any data is loaded
    if output.suffix.lower() != ".csv":
        raise ConvaeError(f"--output {output}: name it .csv")
    _claim([output], run_dir, data, train_data)
    if train_data == "none" and (options.threshold_quantile is not None or options.by == "knn"):
        raise ConvaeError("--train none leaves no training images: --threshold-quantile and --by knn need them")
    model, config = convae.load_model(run_dir, device=convae.tensors.resolve_device(device))
    load = lambda spec, sp: _load_for_run(run_dir, spec, data_dir, sp, image_size, channels, no_download, quiet)  # noqa: E731
    train_spec = train_data if train_data is not None else config.data.spec
    if not train_spec:
        raise ConvaeError(f"{run_dir} was trained from an array: give --train DATA (or --train none)")
    reference = None if train_spec == "none" else load(train_spec, None)
    dataset = load(data, split)
    with tempfile.TemporaryDirectory(
        prefix=f".{output.name}.", dir=output.parent if output.parent.is_dir() else None
    ) as work:
        result = convae.analysis.score_images(
            model, dataset, reference, options, work_dir=work, batch_size=batch_size, progress=not quiet
        )
    convae.analysis.write_scores(output, result)
    order = result.order()
    rows = [
        {"rank": r + 1, "image": dataset.describe(i), **{k: float(v[i]) for k, v in result.scores.items()}}
        for r, i in enumerate(order[:5])
    ]
    click.echo(_table(rows))
    flagged = result.flagged()
    if flagged is not None:
        t = result.thresholds[options.by]
        n_ref = len(result.reference_scores[options.by])
        click.echo(
            f"{int(flagged.sum()):,} of {len(flagged):,} images above the {options.threshold_quantile} quantile "
            f"of {n_ref:,} training images' {options.by} ({t:.4g})"
        )
    click.echo(_line(f"wrote {output} ({len(order):,} images, worst first by {options.by})"))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--index", "index_data", required=True, help="The images searched, e.g. cifar10:train or a folder.")
@click.option("--query", "query_data", required=True, help="The images whose neighbours are found.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="neighbors.png (the grid); neighbors.csv goes beside it (every query's neighbours).",
)
@click.option("--k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option(
    "--layers",
    help="Encoder layers whose features are compared (see `convae layers`). Default: the middle depth (stage2 of the default ConvAE).",
)
@click.option("--pool", default="grid4", show_default=True, help=f"Their pooling: {', '.join(POOLS)}.")
@click.option(
    "--show",
    type=click.IntRange(1, FIGURE_ITEMS_MAX),
    default=8,
    show_default=True,
    help="Queries in the picture (the first ones).",
)
@click.option(
    "--baselines",
    default=",".join(NEIGHBOR_BASELINES),
    show_default=True,
    help="precision@k beside: pixels, random (the architecture untrained), or none.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Where built-in datasets are looked up (then $CONVAE_DATA, ~/.cache/convae).",
)
@click.option("--image-size", help="Resize and centre-crop folder images to this size (default: the run's).")
@click.option("--channels", type=int, help="Image channels: 1 or 3 (default: the run's).")
@click.option("--no-download", is_flag=True, help="Never download a missing built-in dataset.")
@with_compute_options
def neighbors(run_dir, index_data, query_data, output, k, layers, pool, show, baselines, data_dir, image_size, channels, no_download, batch_size, device, precision, compile, quiet):  # fmt: skip
    """The k most similar --index images for each --query image, by cosine similarity of features.

    Exact search in chunks (the index features wait on disk beside --output), so memory stays
    bounded however large the index. Writes the picture grid and a CSV of every query's
    neighbours; with labels on both sets, prints precision@k beside raw pixels and random weights.
    """
    png, csv_path = _neighbor_outputs(output)
    _claim([png, csv_path] if output.suffix.lower() == ".png" else [csv_path, png], run_dir, index_data, query_data)
    chosen = [] if baselines.strip() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    model, _ = convae.load_model(run_dir, device=convae.tensors.resolve_device(device))
    layers = layers or convae.analysis.middle_layer(model)
    convae.features.plan_blocks(model, layers, pool)  # unknown layers: one line before any data is loaded
    load = lambda spec: _load_for_run(run_dir, spec, data_dir, None, image_size, channels, no_download, quiet)  # noqa: E731
    index, query = load(index_data), load(query_data)
    with tempfile.TemporaryDirectory(prefix=f".{png.name}.", dir=png.parent if png.parent.is_dir() else None) as work:
        result = convae.analysis.find_neighbors(
            model, index, query, layers=layers, pool=pool, k=k, baselines=chosen, work_dir=work,
            batch_size=batch_size, progress=not quiet, precision=precision, compile=compile,
        )  # fmt: skip
    convae.analysis.write_neighbors(csv_path, result)
    convae.views.save_figure(convae.analysis.neighbors_grid(result, index, query, show), png)
    if result.precision:
        click.echo(_table([{"features": name, f"precision@{k}": p} for name, p in result.precision.items()]))
    click.echo(
        _line(f"wrote {png} and {csv_path} ({len(query):,} queries x {result.neighbours.indices.shape[1]} neighbours)")
    )


def _neighbor_outputs(output: Path) -> tuple[Path, Path]:
    suffix = output.suffix.lower()
    if suffix not in (".png", ".csv"):
        raise ConvaeError(f"--output {output}: name it .png (the grid; the .csv goes beside it)")
    return output.with_suffix(".png"), output.with_suffix(".csv")


@main.command()
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True)
@click.option("--quiet", "-q", is_flag=True)
def demo(out, quiet):
    """Run the whole pipeline on the built-in digits data."""
    result = convae.demo.run_demo(out, progress=not quiet)
    click.echo(_table(result.model_rows))
    m = result.test_metrics
    click.echo(
        f"\ndigits:test reconstruction: MSE {m['mse']:.5f}, PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f} "
        f"after {len(result.history)} epochs"
    )
    if result.probe_rows:
        click.echo("\nlinear probe on digits (logistic regression; test accuracy):")
        click.echo(_table(result.probe_rows))
    click.echo("outputs:")
    for name, path in result.outputs.items():
        click.echo(_line(f"  {name}: {path}"))


if __name__ == "__main__":
    main()
