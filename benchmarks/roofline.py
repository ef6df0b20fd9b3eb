"""The roofline of convae's whole path: each stage's rate against the bound the machine puts on it.

    .venv/bin/python benchmarks/speed.py --roofline [--sizes 28 32 96 128] [--quick] [--write]
    .venv/bin/python benchmarks/roofline.py ...            # the same

Measures, in one run on this machine:
- the peaks: fp32 matmul (the faster of torch.mm and the same product as a 1x1 convolution, as
  benchmarks/speed.py measures it), bf16 where the CPU computes it natively (else skipped), and
  the memory bandwidth (a numpy copy of a large array: bytes read + bytes written, per second);
- for each image size, with the default model convae builds for it (`default_model_config`):
  reading the images (28: MNIST, 32: CIFAR-10, both from their files; 96 and 128: JPEG folders
  of upsampled CIFAR-10 written by benchmarks/photo_folders.py, so the decoding a user's
  photos go through is measured), a training step (convae's own loop, bf16 autocast where
  native, as `convae fit` trains), extraction of what `convae probe` extracts (every stage
  and the bottleneck, grid4 pooling), and the fit of each probe classifier (logreg, linsvm of
  convae.probe) on the widest of those feature sets, held in each `--probe-dtype` (default: float32,
  as `convae probe` holds them by default, and uint8, the 8-bit codes of the presets' probes, whose
  passes run on int8 products, bounded at the int8 peak measured with them);
- at 28 and 32 px, extraction through each preset's model (mnist, mnist-convae, fashion-mnist, fashion-mnist-convae; cifar10,
  cifar10-patch, cifar10-deep: the model `convae fit --preset` builds, untrained) of the layers
  and pooling the preset's probe reads, on 2,000 images (--no-presets skips them).

Each stage's bound is the larger of its FLOPs over the peak that applies (bf16 for a bf16
step, else fp32) and the bytes it must move over the bandwidth: FLOPs counted by
torch.utils.flop_counter on the model's forward and backward (about 3x the forward); bytes
the images read and the features written; for a classifier, its passes over the feature
matrix (n_passes_, each reading every value once) and 4 x rows x dims x classes FLOPs a pass
(the scores and the gradient). Activations moved between a model's layers are not counted,
so a stage near 100% of a FLOP bound is near the machine's limit, and one far from it is
bound by something the roofline does not see (memory traffic of the activations, dispatch).
JPEG decoding has no FLOP count: its rate is reported without a bound. Where one pass runs
products in two precisions (the cifar10 preset's model convolves its upper stage in bf16 where
that is native), the FLOPs are counted per dtype and each part is bounded by its own peak.

Images: 2,048 a timed training epoch (after one warm-up epoch) and 10,000 extracted, then
probed, up to 32 px; 512 and 2,000 at 96 and 128 px, whose steps cost 9-16x more; each time
a seeded sample spread over the split (a folder lists its images class by class). Extraction
runs the untrained model: a dense model's forward costs the same whatever its weights. The
JPEG folders (10,000 images a split) are written on the first run, then reused.

Writes benchmarks/roofline.json and prints a Markdown table; `--write` puts the table into
benchmarks/RESULTS.md as its "## Roofline" section (replacing an earlier one). `--quick` runs
every stage on a few images to check that the script works: its JSON goes to
benchmarks/runs/roofline-quick.json and it is never written into RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from convae._io import atomic_write_text
from convae.config import TrainConfig
from convae.data import load_dataset
from convae.features import FeatureCodes, FeatureExtractor
from convae.models import ModelConfig, build_model, default_model_config
from convae.presets import PRESETS
from convae.probe import int8
from convae.probe.classifiers import CLASSIFIERS
from convae.probe.driver import column_order, layer_groups
from convae.probe.options import ProbeOptions
from convae.tensors import native_bf16

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script or imported by speed.py: its siblings import alike
from photo_folders import write_photo_folder  # noqa: E402
from speed import DEFAULT_DATA, convae_throughput, in_fresh_process, machine, matmul_peak  # noqa: E402

SIZES = (28, 32, 96, 128)
BUILTIN = {28: "mnist", 32: "cifar10"}
# the presets whose models are timed at each size (digits' 8 px model is too small to time)
PRESET_MODELS = {
    28: ("mnist", "mnist-convae", "fashion-mnist", "fashion-mnist-convae"),
    32: ("cifar10", "cifar10-patch", "cifar10-deep"),
}
PEAK_OF = {torch.float32: "fp32", torch.bfloat16: "bf16"}
PROBE_CLASSIFIERS = ("logreg", "linsvm")
SECTION = "## Roofline"


# -- the machine's limits ----------------------------------------------------------------------
def bandwidth(nbytes: int, repeat: int = 3) -> dict[str, float]:
    """Memory bandwidth from a numpy copy of `nbytes`: (bytes read + bytes written) / best time."""
    src = np.ones(nbytes // 8)
    dst = np.zeros_like(src)  # written once first: no page faults inside the timing
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return {"bytes_copied": float(src.nbytes), "seconds": best, "gb_per_s": 2 * src.nbytes / best / 1e9}


def cpu_features() -> dict:
    """What torch says the CPU can do: the kernels' instruction set, oneDNN, bf16 in hardware (AVX512-BF16, AMX)."""
    flags = getattr(torch.cpu, "get_capabilities", dict)()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "avx512_bf16": bool(flags.get("avx512_bf16")),
        "amx_bf16": bool(flags.get("amx_bf16")),
        "native_bf16": native_bf16(torch.device("cpu")),
        "threads": torch.get_num_threads(),
    }


def best_matmul(sizes: tuple[int, ...], repeats: int, dtype: torch.dtype) -> dict:
    """The matmul peak over several square sizes: the fastest size differs by dtype and machine
    (bf16 through AMX ran several times faster at 1024^3 than at 2048^3 on the busy 2-core machine)."""
    # fewer repeats of the larger products: each 4096^3 one is 8x a 2048^3 one, and as steady
    by_size = {n: matmul_peak(n, max(3, min(repeats, round(repeats * (2048 / n) ** 3))), dtype) for n in sizes}
    n = max(by_size, key=lambda k: by_size[k]["peak"])
    return by_size[n] | {"n": n, "by_size": {str(k): v["peak"] for k, v in by_size.items()}}


def machine_limits(quick: bool, int8_products: bool = False) -> dict:
    """The peaks and the bandwidth; the int8 peak where `int8_products` (8-bit probe rows) and the CPU runs them."""
    sizes, repeats = ((512, 1024), 3) if quick else ((1024, 2048, 4096), 10)
    cpu = cpu_features()
    fp32 = best_matmul(sizes, repeats, torch.float32)
    bf16 = best_matmul(sizes, repeats, torch.bfloat16) if cpu["native_bf16"] else None  # emulated bf16 is no peak
    int8_peak = best_matmul(sizes, repeats, torch.int8) if int8_products and int8.available() else None
    return {
        "cpu": cpu,
        "fp32": fp32,
        "bf16": bf16,
        "int8": int8_peak,
        "bandwidth": bandwidth((256 if quick else 1024) << 20),
    }


# -- one size's stages --------------------------------------------------------------------------
def stage(name: str, count: int, unit: str, seconds: float, flops: float = 0.0, nbytes: float = 0.0, **info) -> dict:
    """A measured stage: `count` units (images or passes) in `seconds`, the FLOPs and bytes they needed."""
    return dict(stage=name, count=count, unit=unit, seconds=seconds, flops=flops, bytes=nbytes, **info)


def read_images(size: int, args) -> tuple[dict, object]:
    """(the read stage, the train split) of `size`: a built-in dataset's files or a JPEG folder."""
    if size in BUILTIN:
        spec, where = BUILTIN[size], dict(data_dir=args.data_dir)
        source = f"{spec} ({'IDX .gz' if size == 28 else 'binary .tar.gz'})"
    else:
        folder = write_photo_folder(size, limit=args.folder_images, data_dir=Path(args.data_dir))
        spec, where = str(folder), {}
        source = f"JPEG folder {folder.relative_to(HERE.parent) if folder.is_relative_to(HERE.parent) else folder}"
    t = time.perf_counter()
    train = load_dataset(spec, "train", **where)  # scanned, checked and decoded, as `convae fit` reads it
    seconds = time.perf_counter() - t
    return stage("read train split", len(train.images), "images", seconds, source=source), train


def model_flops(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> float:
    """FLOPs of one forward (and backward) pass of `model` on the batch `x`, per image."""
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            F.mse_loss(out, x).backward()
    return counter.get_total_flops() / len(x)


def images_for(size: int, given: int | None, small: int, large: int) -> int:
    """How many images a stage takes: as given, else `small` up to 32 px and `large` above (a
    stage at 128 px costs 16x one at 32)."""
    return given or (small if size <= 32 else large)


def spread(n_total: int, n: int) -> np.ndarray:
    """`n` row indices spread over all `n_total` (sorted, seeded): a folder lists its images class
    by class, so its first rows would be one or two classes."""
    return np.sort(np.random.default_rng(0).choice(n_total, size=min(n, n_total), replace=False))


def train_stage(images: np.ndarray, config, args, limits: dict) -> dict:
    """Training steps of the default model through convae's loop, in a fresh process (the last epoch timed)."""
    size = config.image_size[0]
    subset = np.ascontiguousarray(images[spread(len(images), images_for(size, args.train_images, 2_048, 512))])
    n = len(subset)
    batch = TrainConfig.batch_size
    rate = in_fresh_process(convae_throughput, subset, config, batch, 2, "cpu", True)
    x = torch.rand(8, config.in_channels, *config.image_size)
    forward = model_flops(build_model(config), x, backward=False)
    step = model_flops(build_model(config), x, backward=True)
    bf16 = limits["bf16"] is not None  # convae trains in bf16 autocast exactly where it is native
    return stage(
        "train step", n, "images", n / rate, flops=n * step, nbytes=n * subset[0].nbytes,
        peak="bf16" if bf16 else "fp32", forward_flops_per_image=forward, batch=batch,
    )  # fmt: skip


def extract_stage(model, subset: np.ndarray) -> tuple[dict, np.ndarray, FeatureExtractor]:
    """What `convae probe` extracts by default from `subset`: (the stage, the features, the extractor)."""
    options = ProbeOptions()
    groups = layer_groups(model, options.layers)
    layers = {name for g in groups for name in g}
    extractor = FeatureExtractor(model, layers, options.pool, device="cpu", compile="never")  # FLOPs counted op by op
    n = len(subset)
    x = torch.from_numpy(np.asarray(subset[:8])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        flops = model_flops(extractor, x, backward=False)
    # timed compiled, as a probe's extraction runs (10,000 images or more); compiling is in the warm-up
    compiled = FeatureExtractor(model, layers, options.pool, device="cpu", compile="always")
    compiled.transform(subset[: min(n, 64)])  # warm-up: compiling, first-call allocations and kernel choices
    t = time.perf_counter()
    features = compiled.transform(subset)
    seconds = time.perf_counter() - t
    moved = n * (subset[0].nbytes + 4 * extractor.dim)  # images read, float32 features written
    info = dict(layers=sorted({b.layer for b in extractor.blocks}), pool=options.pool, dim=extractor.dim)
    return (
        stage("extract", n, "images", seconds, flops=n * flops, nbytes=moved, peak="fp32", **info),
        features,
        extractor,
    )


class FlopsByDtype(TorchDispatchMode):
    """FLOPs of the matrix products and convolutions a call runs (torch's flop formulas), by the
    dtype each ran in: the hierarchical model's extraction convolves in bf16 where that is native
    and multiplies in fp32, so its bound is the sum of each part over its own peak."""

    def __init__(self):
        super().__init__()
        self.flops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None:  # a composite op (conv2d under inference mode): count what it decomposes into
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.flops[PEAK_OF.get(dtype, str(dtype))] += formula(*args, **kwargs, out_val=out)
        return out


def preset_net(preset: str, image_shape: tuple[int, ...]):
    """The model `convae fit --preset` builds for images of `image_shape`, seeded, untrained: a
    forward pass costs the same whatever the weights."""
    fit = PRESETS[preset].fit
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    overrides = {k: v for k, v in fit.items() if k in fields}
    overrides["channels"] = tuple(int(c) for c in str(fit["widths"]).split(","))
    torch.manual_seed(0)
    return build_model(default_model_config(image_shape, **overrides))


def preset_model(preset: str, image_shape: tuple[int, ...], compile: str = "auto"):
    """:func:`preset_net`, and the extractor of what the preset's probe reads from it."""
    model = preset_net(preset, image_shape)
    return model, preset_extractor(preset, model, compile)


def preset_extractor(preset: str, model, compile: str = "auto") -> FeatureExtractor:
    """The extractor of what `preset`'s probe reads from `model`, in the probe's column order."""
    probe = ProbeOptions(layers=PRESETS[preset].probe["layers"], pool=PRESETS[preset].probe.get("pool", "grid4"))
    layers = column_order(layer_groups(model, probe.layers))
    return FeatureExtractor(model, layers, probe.pool, device="cpu", keep_order=True, compile=compile)


def preset_extract_stage(preset: str, images: np.ndarray) -> dict:
    """Extraction of what `convae probe --preset` reads, through the preset's model."""
    model, extractor = preset_model(preset, images.shape[1:], compile="never")  # FLOPs counted op by op
    x = torch.from_numpy(np.asarray(images[:8])).permute(0, 3, 1, 2).float() / 255
    with FlopsByDtype() as counted:
        extractor(x)
    flops = {k: v / len(x) for k, v in counted.flops.items()}
    extractor = preset_extractor(preset, model, compile="always")  # timed as a probe runs it
    extractor.transform(images[: min(len(images), 64)])  # warm-up: compiling
    t = time.perf_counter()
    extractor.transform(images)
    seconds = time.perf_counter() - t
    n = len(images)
    moved = n * (images[0].nbytes + 4 * extractor.dim)
    layers = ",".join(dict.fromkeys(b.layer for b in extractor.blocks))
    return stage(
        f"extract, {preset} preset", n, "images", seconds, flops=n * sum(flops.values()), nbytes=moved,
        peak="+".join(sorted(flops)), flops_by_peak={k: n * v for k, v in flops.items()},
        layers=layers, pool=extractor.pools[0], dim=extractor.dim, params=sum(p.numel() for p in model.parameters()),
    )  # fmt: skip


def probe_matrix(features: np.ndarray, dtype: str) -> np.ndarray:
    """`features` as the probe holds them in `dtype`: uint8 is their 8-bit codes (FeatureCodes)."""
    if dtype != "uint8":
        return np.ascontiguousarray(features, dtype=dtype)
    X = np.empty(features.shape, dtype=np.uint8)
    FeatureCodes.fitted(features).encode(features, X)
    return X


def probe_stages(features: np.ndarray, labels: np.ndarray, extractor: FeatureExtractor, dtype: str) -> list[dict]:
    """Each probe classifier fitted on the widest feature set, as `convae probe` fits it.

    A pass over 8-bit codes on the CPU multiplies int8 digits (convae.probe.int8): the weights'
    WEIGHT_DIGITS and the residuals' RESIDUAL_DIGITS products, counted at the int8 peak."""
    widest = max(extractor.blocks, key=lambda b: b.stop - b.start)
    X = probe_matrix(features[:, widest.start : widest.stop], dtype)
    n, d = X.shape
    k = len(np.unique(labels))
    on_int8 = dtype == "uint8" and int8.chunk_rows(n, d, torch.device("cpu"), None) > 0
    products = 2.0 * (int8.WEIGHT_DIGITS + int8.RESIDUAL_DIGITS) if on_int8 else 4.0  # a pass's, per n x d x class
    rows = []
    for name in PROBE_CLASSIFIERS:
        clf = CLASSIFIERS[name](0, n, d, 1.0, None)
        t = time.perf_counter()
        clf.fit(X, labels)
        seconds = time.perf_counter() - t
        passes = int(clf.n_passes_)
        classes = 1 if k == 2 else k
        rows.append(
            stage(
                f"probe {name} fit",
                passes,
                "passes",
                seconds,
                flops=(passes - 1) * products * n * d * classes,
                nbytes=passes * X.nbytes,
                peak="int8" if on_int8 else "fp32",
                features=f"{widest.layer}/{widest.pool}",
                rows=n,
                dims=d,
                dtype=dtype,
                iterations=int(np.max(clf.n_iter_)),
            )  # fmt: skip
        )
    return rows


def measure_size(size: int, args, limits: dict) -> dict:
    read, train = read_images(size, args)
    config = default_model_config(train.images.shape[1:])
    stages = [read, train_stage(train.images, config, args, limits)]
    torch.manual_seed(0)
    model = build_model(config)  # untrained: the time of a forward pass does not depend on the weights
    rows = spread(len(train.images), images_for(size, args.extract_images, 10_000, 2_000))
    extract, features, extractor = extract_stage(model, train.images[rows])
    stages.append(extract)
    for dtype in args.probe_dtype:
        stages += probe_stages(features, np.asarray(train.labels)[rows], extractor, dtype)
    preset_rows = spread(len(train.images), args.extract_images or 2_000)
    for preset in PRESET_MODELS.get(size, ()) if args.presets else ():
        stages.append(preset_extract_stage(preset, train.images[preset_rows]))
    model_name = f"default {list(config.channels)} x{config.convs_per_stage}, {sum(p.numel() for p in model.parameters()):,} parameters"
    return {"size": size, "model": model_name, "stages": [bound(s, limits) for s in stages]}


# -- bounds and the table -----------------------------------------------------------------------
def bound(s: dict, limits: dict) -> dict:
    """`s` with its roofline: seconds the FLOPs and the bytes need at the peaks, the larger, and the ratio."""
    peak = s.get("peak")
    if peak is None:
        return s | {"bound": None, "bound_seconds": None, "fraction_of_bound": None}
    parts = s.get("flops_by_peak") or {peak: s["flops"]}
    compute = sum(f / (limits[p]["peak"] * 1e9) for p, f in parts.items())  # each part at its own peak
    memory = s["bytes"] / (limits["bandwidth"]["gb_per_s"] * 1e9)
    which = f"{peak} matmul peak" if compute >= memory else "memory bandwidth"
    limit = max(compute, memory)
    return s | {
        "compute_seconds": compute,
        "memory_seconds": memory,
        "bound": which,
        "bound_seconds": limit,
        "fraction_of_bound": limit / s["seconds"] if s["seconds"] > 0 else None,
    }


def _rate(s: dict) -> str:
    rate = f"{s['count'] / s['seconds']:,.1f} {s['unit']}/s" if s["seconds"] > 0 else "-"
    parts = []
    if s["flops"]:
        parts.append(f"{s['flops'] / s['seconds'] / 1e9:.1f} {'GOP/s' if s.get('peak') == 'int8' else 'GFLOP/s'}")
    if s["unit"] == "passes":
        parts.append(f"{s['bytes'] / s['seconds'] / 1e9:.1f} GB/s read")
    return rate + (f" ({', '.join(parts)})" if parts else "")


def _work(s: dict) -> str:
    n = s["count"]
    if s["stage"].startswith("probe"):
        return f"{s['rows']:,} x {s['dims']:,} {s['dtype']} ({s['features']}), {s['iterations']} iterations"
    if s["stage"] == "read train split":
        return f"{n:,} images, {s['source']}"
    per = f"{s['flops'] / n / 1e9:.3f} GFLOP/image" if s["flops"] else ""
    if "flops_by_peak" in s and len(s["flops_by_peak"]) > 1:
        per += " (" + ", ".join(f"{p} {f / n / 1e9:.3f}" for p, f in sorted(s["flops_by_peak"].items())) + ")"
    if "layers" in s and "preset" in s["stage"]:
        per += f", {s['layers']}/{s['pool']}"
    return f"{n:,} images, {per}" + (f", {s['dim']:,} features" if "dim" in s else "")


def table(results: dict) -> list[str]:
    lines = [
        "| px | stage | work | measured | bound by | bound's rate | % of bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in results["sizes"]:
        for s in size["stages"]:
            if s["bound"] is None:
                limit, pct, by = "-", "-", "(decoding: no FLOP count)"
            else:
                limit = f"{s['count'] / s['bound_seconds']:,.0f} {s['unit']}/s"
                pct, by = f"{100 * s['fraction_of_bound']:.1f}%", s["bound"]
            lines.append(f"| {size['size']} | {s['stage']} | {_work(s)} | {_rate(s)} | {by} | {limit} | {pct} |")
    return lines


def section(results: dict, command: str) -> list[str]:
    lim = results["limits"]
    bf16 = (
        f", bf16 **{lim['bf16']['peak']:.1f} GFLOP/s** (at {lim['bf16']['n']}^3)"
        if lim["bf16"]
        else ", bf16 not measured (no native bf16: convae trains in fp32)"
    )
    if lim.get("int8"):
        bf16 += f", int8 **{lim['int8']['peak']:.1f} GOP/s** (torch._int_mm at {lim['int8']['n']}^3)"
    quick = " **--quick: smoke-test sizes, not a measurement.**" if results["quick"] else ""
    lines = [
        f"{SECTION} — {results['date']}",
        "",
        f"Machine: {results['machine']}; CPU capability {lim['cpu']['capability']}, oneDNN "
        f"{'yes' if lim['cpu']['mkldnn'] else 'no'}.{quick}",
        f"Command: `{command}` ({results['seconds']:.0f} s in all). Models: "
        + "; ".join(f"{s['size']} px {s['model']}" for s in results["sizes"])
        + ".",
        "",
        f"Peaks (the best of {', '.join(f'{n}^3' for n in lim['fp32']['by_size'])}): fp32 matmul "
        f"**{lim['fp32']['peak']:.1f} GFLOP/s** (at {lim['fp32']['n']}^3: mm {lim['fp32']['mm']:.0f} / 1x1 conv "
        f"{lim['fp32']['conv']:.0f}){bf16}; memory bandwidth "
        f"**{lim['bandwidth']['gb_per_s']:.1f} GB/s** (a copy of {lim['bandwidth']['bytes_copied'] / 2**20:.0f} MiB, "
        "bytes read + written).",
        "",
        "A stage's bound is the larger of its FLOPs over the peak it runs at (training: bf16 where "
        "native, as `convae fit` trains; extraction and the probe's classifiers: fp32, except the "
        "hierarchical model's bf16 convolutions, each part at its own peak) and its bytes "
        "over the bandwidth; % of bound is the bound's time over the measured time. FLOPs: torch's "
        "flop counter over the default model's forward and backward (training, ~3x the forward) or "
        "its forward up to the probed layers (extraction, every stage and the bottleneck at grid4); "
        "for a classifier 4 x rows x dims x classes a pass (over 8-bit codes: 14 x rows x dims x classes "
        "int8 products, its weights' and residuals' digits, at the int8 peak), each pass reading the "
        "feature matrix once (passes: L-BFGS's evaluations + the column statistics). Activations moved between layers are "
        "not counted: a convolutional stage far below its FLOP bound is held back by what the roofline "
        "does not see.",
        "",
    ]
    return lines + table(results) + [""]


def write_section(path: Path, lines: list[str]) -> None:
    """`lines` as the results file's Roofline section: replacing the one there, else appended."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = "\n".join(lines).rstrip("\n") + "\n"
    found = re.search(rf"^{re.escape(SECTION)}\b.*?(?=^## |\Z)", text, flags=re.M | re.S)
    if found:
        text = text[: found.start()] + block + ("\n" if text[found.end() :] else "") + text[found.end() :]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block
    atomic_write_text(path, text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=SIZES, help="image sizes (px)")
    p.add_argument("--quick", action="store_true", help="small runs, for a smoke test (not a measurement)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument(
        "--train-images", type=int, help="images per timed training epoch (default 2,048, 512 above 32 px; --quick 64)"
    )
    p.add_argument(
        "--extract-images",
        type=int,
        help="images extracted, then probed (default 10,000, 2,000 above 32 px; --quick 256)",
    )
    p.add_argument(
        "--folder-images", type=int, help="images per split of each JPEG folder (default 10,000; --quick 256)"
    )
    p.add_argument("--no-presets", dest="presets", action="store_false", help="skip the preset models' extraction rows")
    p.add_argument(
        "--probe-dtype",
        nargs="+",
        choices=["float32", "float16", "uint8"],
        default=["float32", "uint8"],
        help="the features' dtypes as the probe holds them, a row each (float32: `convae probe`'s default; "
        "uint8: 8-bit codes, as the presets' probes)",
    )
    p.add_argument(
        "--json", type=Path, help="default benchmarks/roofline.json (--quick: benchmarks/runs/roofline-quick.json)"
    )
    p.add_argument("--results", type=Path, help="default benchmarks/RESULTS.md (--quick: none, give one)")
    p.add_argument("--write", action="store_true", help="put the table into --results as its Roofline section")
    return p


def main(argv: list[str] | None = None, prog: str = "benchmarks/roofline.py") -> dict:
    cli = parser()
    args = cli.parse_args(argv)
    if args.quick and args.write and args.results is None:  # a smoke test's numbers are no results
        cli.error("--quick --write: give --results FILE (a smoke test does not go into benchmarks/RESULTS.md)")
    args.results = args.results or HERE / "RESULTS.md"
    args.json = args.json or (HERE / "runs" / "roofline-quick.json" if args.quick else HERE / "roofline.json")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.quick:  # every stage runs, on a few images
        args.train_images, args.extract_images = args.train_images or 64, args.extract_images or 256
    args.folder_images = args.folder_images or (256 if args.quick else 10_000)
    started = time.time()
    limits = machine_limits(args.quick, int8_products="uint8" in args.probe_dtype)
    sizes = [measure_size(size, args, limits) for size in args.sizes]
    results = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "machine": machine(),
        "quick": args.quick,
        "limits": limits,
        "sizes": sizes,
        "seconds": time.time() - started,
    }
    atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    lines = section(results, " ".join([".venv/bin/python", prog, *(sys.argv[1:] if argv is None else argv)]))
    print("\n".join(lines))
    if args.write:
        write_section(args.results, lines)
    return results


if __name__ == "__main__":
    main()
