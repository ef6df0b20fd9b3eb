"""Speed benchmark: matmul peak, training and extraction throughput, memory.

    .venv/bin/python benchmarks/speed.py [--data-dir ../shared/datasets] [--repeat 3] [--quick]
    .venv/bin/python benchmarks/speed.py --roofline [--sizes 28 32 96 128] [--quick] [--write]
    python benchmarks/speed.py --device cuda [--cifar cifar10-subset.npy]   # on a GPU machine

Measures on this machine, in one run, and appends a section to benchmarks/RESULTS.md:
- fp32 matmul peak (GFLOP/s; the faster of torch.mm and the same product as a 1x1
  convolution), and the bf16 one where the CPU computes bf16 natively;
- training throughput (images/s) of the default MNIST and CIFAR-10 models through
  convae's own training loop (bf16 autocast where the CPU has it, as `convae fit` does),
  the model's FLOPs per image (forward + backward, counted by torch.utils.flop_counter),
  achieved GFLOP/s and the fraction of the peak;
- the same model trained by a tutorial-style loop (DataLoader over a float TensorDataset,
  `.item()` every step, fp32) and the ratio between the two; on a CPU with native bf16 also
  convae's loop in fp32 (`--no-amp`) and the tutorial loop with bf16 autocast added, so the
  precision's share of the speed-up is told apart from the loop's. Each loop runs in a fresh
  process, so none inherits another's allocator state or warmed-up memory, and they
  alternate `--repeat` times, the best of each kept (this host's speed drifts);
- extraction throughput and peak memory (max RSS of a fresh process) for 10,000 and
  100,000 images read from a memmap, to show that memory stays flat.

With `--roofline` (options: `--roofline --help`), the roofline of the whole path instead, per
image size: each stage's rate (reading the images, a training step, extraction, each probe
classifier's fit) against the bound the fp32/bf16 matmul peak and the memory bandwidth put on it
(benchmarks/roofline.py; writes benchmarks/roofline.json, `--write` its RESULTS.md section).

With `--device cuda` the same, on the GPU: fp32 (no TF32) and bf16 matmul peaks, convae's
loop (bf16 autocast, channels_last) at the default batch and at `--gpu-batch`, against the
tutorial loop on the GPU (fp32, each batch copied from a CPU DataLoader), and extraction with
the GPU's peak memory beside the process's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import convae
from convae.config import TrainConfig
from convae.data import load_dataset
from convae.models import build_model, default_model_config
from convae.tensors import native_bf16
from convae.train import fit

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"


def best_seconds(product, repeats: int, warmup: int = 3) -> float:
    """The fastest of `repeats` timed calls of `product()`, after `warmup` untimed ones."""
    for _ in range(warmup):
        product()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """GFLOP/s of an n^3 product two ways: torch.mm (MKL's GEMM for fp32) and the same product as a
    1x1 convolution (oneDNN, which runs the model's convolutions). On AMD CPUs MKL's fp32 GEMM
    can run at half of oneDNN's, so the peak is the faster of the two. int8: G int8 products a
    second of ``torch._int_mm`` (int32 sums, oneDNN), the probe's passes over 8-bit codes' product."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (n, n), dtype=torch.int8) for _ in range(2))
        rate = 2 * n**3 / best_seconds(lambda: torch._int_mm(a, b), repeats) / 1e9
        return {"mm": rate, "peak": rate}
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = a.T.reshape(1, n, 32, n // 32).contiguous(memory_format=torch.channels_last)
    w = b.T.reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    rates = {name: 2 * n**3 / best_seconds(product, repeats) / 1e9
             for name, product in (("mm", lambda: a @ b), ("conv", lambda: F.conv2d(x, w)))}  # fmt: skip
    rates["peak"] = max(rates["mm"], rates["conv"])
    return rates


def train_images(source: str, data_dir: str) -> np.ndarray:
    """A built-in dataset's train split, or every image of an .npy file."""
    if source.endswith(".npy"):
        return load_dataset(source).images
    return load_dataset(source, "train", data_dir=data_dir).images


def gpu_matmul_peak(dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Median TFLOP/s of an n^3 product on random data, timed with CUDA events."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


def train_flops_per_image(config, batch: int = 32) -> float:
    model = build_model(config)
    x = torch.rand(batch, config.in_channels, *config.image_size)
    with FlopCounterMode(display=False) as counter:
        loss = F.mse_loss(model(x), x)
        loss.backward()
    return counter.get_total_flops() / batch


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def convae_throughput(
    images: np.ndarray, config, batch_size: int, epochs: int = 2, device: str = "cpu", amp: bool = True
) -> float:
    """Images/s of convae's own loop (steady state: the last epoch, validation excluded)."""
    train = TrainConfig(epochs=epochs, batch_size=batch_size, val_fraction=0.0, warmup=0.0, device=device, amp=amp)
    result = fit(images, config, train)
    return result.history[-1]["images_per_s"]


def reference_throughput(
    images: np.ndarray, config, batch_size: int, epochs: int = 2, device: str = "cpu", amp: bool = False
) -> float:
    """The loop tutorials write: float TensorDataset, DataLoader(shuffle), .item() every step.

    `amp` wraps its forward pass in bf16 autocast: the one line a tutorial would add for it.
    """
    torch.manual_seed(0)
    model = build_model(config).to(device)
    data = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    rate = 0.0
    for _ in range(epochs):
        start, seen, running = time.perf_counter(), 0, 0.0
        for (x,) in loader:
            x = x.to(device)
            optimizer.zero_grad()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
                loss = F.mse_loss(model(x).float(), x)
            loss.backward()
            optimizer.step()
            running += loss.item()
            seen += len(x)
        rate = seen / (time.perf_counter() - start)
    return rate


def compare_loops(
    name: str, images: np.ndarray, config, batch: int, repeat: int, device: str, fp32_too: bool = False
) -> dict:
    """convae's loop and the tutorial loop, alternating `repeat` times, each in a fresh process.

    `fp32_too` adds convae's loop with --no-amp and the tutorial loop with bf16 autocast, so
    a bf16 speed-up is told apart from the loop's own.
    """
    loops = {"ours": (convae_throughput, True), "ref": (reference_throughput, False)}
    if fp32_too:
        loops |= {"ours_fp32": (convae_throughput, False), "ref_bf16": (reference_throughput, True)}
    runs: dict[str, list[float]] = {key: [] for key in loops}
    for _ in range(repeat):
        for key, (loop, amp) in loops.items():
            runs[key].append(in_fresh_process(loop, images, config, batch, 2, device, amp))
    return dict(
        model=f"{name} default {list(config.channels)} x{config.convs_per_stage}, batch {batch}",
        images=len(images),
        **{f"{key}_runs": values for key, values in runs.items()},
        **{key: max(values) for key, values in runs.items()},
    )


def append_section(lines: list[str], path: str) -> None:
    text = "\n".join(lines) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
    print(text)


EXTRACT_CHILD = r"""
import json, resource, sys, time, numpy as np, torch
from convae.features import FeatureExtractor, extract_to_file
from convae.models import build_model, default_model_config
path, n, out, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
images = np.load(path, mmap_mode="r")[:n]
torch.manual_seed(0)
model = build_model(default_model_config(images.shape[1:]))
extractor = FeatureExtractor(model, "stage2", "grid2", batch_size=256 if device == "cpu" else None, device=device)
t = time.perf_counter()
extract_to_file(extractor, images, out, workers=0)
seconds = time.perf_counter() - t
gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device != "cpu" else None
print(json.dumps({"images": n, "seconds": seconds, "images_per_s": n / seconds, "dim": extractor.dim,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_mb": gpu_mb}))
"""


def extraction_runs(base: np.ndarray, sizes=(10_000, 100_000), device: str = "cpu") -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "images.npy"
        big = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(max(sizes), *base.shape[1:]))
        for start in range(0, len(big), len(base)):
            stop = min(start + len(base), len(big))
            big[start:stop] = base[: stop - start]
        big.flush()
        del big
        for n in sizes:
            out = Path(tmp) / f"features-{n}.npy"
            proc = subprocess.run(
                [sys.executable, "-c", EXTRACT_CHILD, str(path), str(n), str(out), device],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            out.unlink()
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, convae {convae.__version__}, Python {platform.python_version()}"


def main() -> None:
    if "--roofline" in sys.argv[1:]:  # its own options: see benchmarks/roofline.py
        import roofline

        roofline.main([a for a in sys.argv[1:] if a != "--roofline"], prog="benchmarks/speed.py --roofline")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--train-images", type=int, default=5_120, help="MNIST images per timed training epoch")
    parser.add_argument("--cifar-images", type=int, default=1_280, help="CIFAR-10 images per timed training epoch")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs of each training loop (best kept)")
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--gpu-batch", type=int, default=512, help="the larger batch measured on the GPU")
    parser.add_argument("--mnist", default="mnist", help="MNIST: the built-in name or an .npy of its images")
    parser.add_argument("--cifar", default="cifar10", help="CIFAR-10: the built-in name or an .npy of its images")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: this machine has no CUDA GPU")
        return gpu_main(args)
    n_train = {"mnist": 1_280 if args.quick else args.train_images, "cifar10": 256 if args.quick else args.cifar_images}
    sizes = (2_000, 20_000) if args.quick else (10_000, 100_000)

    started = time.time()
    fp32_rates = matmul_peak()
    peak = fp32_rates["peak"]
    bf16 = native_bf16(torch.device("cpu"))
    bf16_rates = matmul_peak(dtype=torch.bfloat16) if bf16 else None
    bf16_peak = bf16_rates["peak"] if bf16 else None
    rows = []
    batch = TrainConfig.batch_size  # the defaults a user gets
    for name, spec in (("MNIST", "mnist"), ("CIFAR-10", "cifar10")):
        data = train_images(getattr(args, "cifar" if spec == "cifar10" else spec), args.data_dir)
        images = np.ascontiguousarray(data[: n_train[spec]])
        config = default_model_config(images.shape[1:])
        flops = train_flops_per_image(config)
        rows.append(compare_loops(name, images, config, batch, args.repeat, "cpu", fp32_too=bf16) | dict(flops=flops))
        if name == "MNIST":
            extraction = extraction_runs(images, sizes)

    lines = [
        "",
        f"## Speed — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python benchmarks/speed.py --repeat {args.repeat}{' --quick' if args.quick else ''}` "
        f"(training: {n_train['mnist']:,} MNIST / {n_train['cifar10']:,} CIFAR-10 images a timed epoch, after one warm-up epoch; "
        f"each loop in a fresh process, the loops alternating, best of {args.repeat} each) "
        f"({time.time() - started:.0f} s in all).",
        "",
        "Matmul peaks (2048^3, best of 10; the faster of torch.mm and the same product as a 1x1 convolution, "
        f"mm / conv in brackets): fp32 **{peak:.1f} GFLOP/s** ({fp32_rates['mm']:.0f} / {fp32_rates['conv']:.0f})"
        + (
            f", bf16 **{bf16_peak:.1f} GFLOP/s** ({bf16_rates['mm']:.0f} / {bf16_rates['conv']:.0f})."
            if bf16
            else " (this CPU has no native bf16: convae trains in fp32)."
        ),
        "",
    ]
    if bf16:
        lines += [
            "convae trains in bf16 autocast here (its default where the CPU computes bf16 natively); the tutorial "
            "loop in fp32, as tutorials write it. Beside them: convae with `--no-amp` (fp32) and the tutorial loop "
            "with bf16 autocast added (one `with torch.autocast(...)` line).",
            "",
            "| model | train GFLOP/image | convae images/s | achieved GFLOP/s | % of bf16 peak | % of fp32 peak "
            "| tutorial loop images/s | speed-up | convae fp32 images/s (% of fp32 peak) | tutorial loop + bf16 autocast "
            "images/s | convae / tutorial + autocast |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            achieved = r["ours"] * r["flops"] / 1e9
            fp32_achieved = r["ours_fp32"] * r["flops"] / 1e9
            lines.append(
                f"| {r['model']} | {r['flops'] / 1e9:.3f} | {r['ours']:,.0f} | {achieved:.1f} | "
                f"{100 * achieved / bf16_peak:.0f}% | {100 * achieved / peak:.0f}% | {r['ref']:,.0f} | "
                f"**{r['ours'] / r['ref']:.2f}x** | {r['ours_fp32']:,.0f} ({100 * fp32_achieved / peak:.0f}%) | "
                f"{r['ref_bf16']:,.0f} | {r['ours'] / r['ref_bf16']:.2f}x |"
            )
    else:
        lines += [
            "| model | train GFLOP/image | convae images/s | achieved GFLOP/s | % of peak | tutorial loop images/s | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            achieved = r["ours"] * r["flops"] / 1e9
            lines.append(
                f"| {r['model']} | {r['flops'] / 1e9:.3f} | {r['ours']:.0f} | {achieved:.1f} | "
                f"{100 * achieved / peak:.0f}% | {r['ref']:.0f} | {r['ours'] / r['ref']:.2f}x |"
            )
    lines.append("")
    names = {
        "ours": "convae",
        "ref": "tutorial loop",
        "ours_fp32": "convae fp32",
        "ref_bf16": "tutorial loop + autocast",
    }
    for r in rows:
        listed = "; ".join(
            f"{label} {', '.join(f'{v:,.0f}' for v in r[key + '_runs'])}" for key, label in names.items() if key in r
        )
        lines.append(
            f"- {r['model'].split(' default')[0]}, every run in order (images/s): {listed}; "
            f"ratio of the medians (convae / tutorial loop) {np.median(r['ours_runs']) / np.median(r['ref_runs']):.2f}x."
        )
    lines += [
        "",
        "Extraction (MNIST default model, `stage2` with `grid2` pooling, from a uint8 memmap, fresh process each):",
        "",
        "| images | seconds | images/s | feature dim | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for e in extraction:
        lines.append(
            f"| {e['images']:,} | {e['seconds']:.1f} | {e['images_per_s']:.0f} | {e['dim']} | {e['max_rss_mb']:.0f} |"
        )
    append_section(lines, args.results)


def gpu_main(args) -> None:
    started = time.time()
    fp32, bf16 = gpu_matmul_peak(torch.float32), gpu_matmul_peak(torch.bfloat16)
    rows = []
    batches = (TrainConfig.batch_size, args.gpu_batch)
    for name, source in (("MNIST", args.mnist), ("CIFAR-10", args.cifar)):
        images = np.ascontiguousarray(train_images(source, args.data_dir))
        config = default_model_config(images.shape[1:])
        flops = train_flops_per_image(config)
        for batch in batches:
            rows.append(compare_loops(name, images, config, batch, args.repeat, "cuda") | dict(flops=flops))
        if name == "MNIST":
            extraction = extraction_runs(images[:10_000], (10_000, 100_000), "cuda")

    lines = [
        "",
        f"## Speed on a GPU — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        f"Machine: {machine()}.",
        f"Command: `python benchmarks/speed.py --device cuda --repeat {args.repeat} --gpu-batch {args.gpu_batch}"
        f"{'' if args.cifar == 'cifar10' else ' --cifar ' + Path(args.cifar).name}` "
        f"(training: {rows[0]['images']:,} MNIST / {rows[-1]['images']:,} CIFAR-10 images a timed epoch, after one "
        f"warm-up epoch; each loop in a fresh process, the two alternating, best of {args.repeat} each) "
        f"({time.time() - started:.0f} s in all).",
        "",
        f"Matmul peaks (8192^3, median of 20, CUDA events): fp32 without TF32 **{fp32:.1f} TFLOP/s**, "
        f"bf16 **{bf16:.0f} TFLOP/s**. convae trains in bf16 autocast with channels_last; the tutorial loop in fp32.",
        "",
        "| model | train GFLOP/image | convae images/s | achieved TFLOP/s | % of bf16 peak | tutorial loop images/s | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        achieved = r["ours"] * r["flops"] / 1e12
        lines.append(
            f"| {r['model']} | {r['flops'] / 1e9:.3f} | {r['ours']:,.0f} | {achieved:.2f} | "
            f"{100 * achieved / bf16:.1f}% | {r['ref']:,.0f} | {r['ours'] / r['ref']:.2f}x |"
        )
    lines.append("")
    for r in rows:
        lines.append(
            f"- {r['model']}, every run in order (images/s): convae {', '.join(f'{v:,.0f}' for v in r['ours_runs'])}; "
            f"tutorial loop {', '.join(f'{v:,.0f}' for v in r['ref_runs'])}."
        )
    lines += [
        "",
        "Extraction on the GPU (MNIST default model, `stage2` with `grid2` pooling, from a uint8 memmap, fresh process each):",
        "",
        "| images | seconds | images/s | feature dim | peak RSS (MB) | peak GPU memory (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for e in extraction:
        lines.append(
            f"| {e['images']:,} | {e['seconds']:.1f} | {e['images_per_s']:,.0f} | {e['dim']} | "
            f"{e['max_rss_mb']:.0f} | {e['gpu_mb']:.0f} |"
        )
    append_section(lines, args.results)


if __name__ == "__main__":
    main()
