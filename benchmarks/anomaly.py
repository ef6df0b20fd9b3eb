"""One-class novelty detection: train on one class, score a split, AUROC with that class as normal.

    .venv/bin/python benchmarks/anomaly.py --data-dir ../shared/datasets --split validation \\
        [--datasets mnist,fashion-mnist,cifar10] [--classes 0,1,...] [--seeds 0] [--out FILE.json]
    .venv/bin/python benchmarks/anomaly.py --split test --select benchmarks/anomaly-validation.json ...

The standard protocol (Ruff et al., ICML 2018): for each class c of the dataset, an autoencoder
is trained on the train images of class c only; every image of the evaluation split is scored,
and AUROC is measured with c as the normal class and the other nine as anomalies.

Beside convae's scores (reconstruction MSE, 1 - SSIM, and the k-NN distance to the class's
training images in the features of a layer and pooling, cosine or euclidean), on the same
images: PCA reconstruction error (fitted on the class's training pixels), the k-NN distance on
raw pixels, and the same k-NN scores with the same architecture untrained (random weights,
batch-norm statistics measured on the class's training images).

``--split validation`` never touches the test split: a fixed 10% of every class of the train
split (seed 0) is held out as the evaluation set, and training uses the rest of class c; every
candidate scorer's AUROC is recorded. ``--split test`` trains on all train images of class c
and scores the test split once, with the candidates ``--select`` names: for each family
(convae, random, pixels, pca) the one with the best mean validation AUROC in that file.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets"

# The model each dataset is trained with (ConvAutoencoder settings): the default architecture for
# the image size, 5 epochs on the class's images (a few minutes on one core of the 2-core CPU).
MODELS = {
    "mnist": dict(channels=(32, 64, 128), convs_per_stage=1, epochs=5, batch_size=64, threads=1),
    "fashion-mnist": dict(channels=(32, 64, 128), convs_per_stage=1, epochs=5, batch_size=64, threads=1),
    "cifar10": dict(channels=(64, 128, 256), convs_per_stage=1, epochs=5, batch_size=64, threads=1),
}
KS = (1, 5, 20)
POOLS = ("grid2", "grid4")  # global pooling (avg) measured worse on the first classes tried
FEATURE_METRICS = ("cosine",)  # euclidean on features measured worse on the first classes tried
PCA_VARIANCE = (0.8, 0.9, 0.95)
# Ruff et al. 2018, Table 1, one-class Deep SVDD, mean AUROC over 10 seeds (%), per class.
# Source: the per-class numbers as quoted by a reimplementation's README ("original") in the
# search corpus; see RESULTS.md. The paper has no Fashion-MNIST experiment.
DEEP_SVDD = {
    "mnist": [98.0, 99.7, 91.7, 91.9, 94.9, 88.5, 98.3, 94.6, 93.9, 96.5],
    "cifar10": [61.7, 65.9, 50.8, 59.1, 60.9, 65.7, 67.7, 67.3, 75.9, 73.1],
}


def held_out(labels: np.ndarray, fraction: float = 0.1, seed: int = 0) -> np.ndarray:
    """A fixed, stratified `fraction` of the train split: the validation evaluation set (mask)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        mask[rng.permutation(rows)[: int(round(fraction * len(rows)))]] = True
    return mask


def auroc(normal: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(~normal, score))


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255


def knn_scores(prefix: str, model, train_images, eval_images, wanted: set[str] | None) -> dict[str, np.ndarray]:
    """k-NN distances of the evaluation images to the training images, per layer, pooling, metric
    and k (only those in `wanted`, when given); one forward pass per image serves every block."""
    from convae.analysis import knn_distance, nearest
    from convae.features import FeatureExtractor

    blocks = [(layer, pool) for layer in model.hierarchy_layers() for pool in POOLS]
    if wanted is not None:
        blocks = [b for b in blocks if any(w.startswith(f"{prefix}/knn/{b[0]}/{b[1]}/") for w in wanted)]
    if not blocks:
        return {}
    ex = FeatureExtractor(model, {b[0] for b in blocks}, {b[1] for b in blocks})
    ref_all, query_all = ex.transform(train_images), ex.transform(eval_images)
    out = {}
    for b in ex.blocks:
        if (b.layer, b.pool) not in blocks:
            continue
        for metric in FEATURE_METRICS:
            found = nearest(query_all[:, b.columns], ref_all[:, b.columns], max(KS), metric=metric)
            for k in KS:
                sub = type(found)(found.indices[:, :k], found.similarity[:, :k])
                out[f"{prefix}/knn/{b.layer}/{b.pool}/{metric}/k{k}"] = knn_distance(sub, metric)
    return out


def baseline_scores(train_images, eval_images) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA

    from convae.analysis import knn_distance, nearest

    out = {}
    xtr, xev = pixels(train_images), pixels(eval_images)
    for var in PCA_VARIANCE:
        pca = PCA(n_components=var, random_state=0).fit(xtr)
        recon = pca.inverse_transform(pca.transform(xev))
        out[f"pca/{var}"] = ((recon - xev) ** 2).mean(1)
    for metric in ("cosine", "euclidean"):
        found = nearest(xev, xtr, max(KS), metric=metric)
        for k in KS:
            out[f"pixels/knn/{metric}/k{k}"] = knn_distance(
                type(found)(found.indices[:, :k], found.similarity[:, :k]), metric
            )
    return out


def one_class(name: str, train, evaluation, c: int, seed: int, wanted: set[str] | None) -> dict:
    """AUROC of every scorer (or of those in `wanted`) with class `c` normal; seconds taken."""
    import torch

    import convae
    from convae.analysis import reconstruction_errors
    from convae.probe import calibrate

    train_images = train.images[train.labels == c]
    t0 = time.perf_counter()
    est = convae.ConvAutoencoder(seed=seed, verbose=False, **MODELS[name]).fit(train_images)
    fit_seconds = time.perf_counter() - t0
    model = est.model_.eval()
    layers = model.hierarchy_layers()
    normal = evaluation.labels == c
    t1 = time.perf_counter()
    mse, ssim = reconstruction_errors(model, evaluation.images)
    scores = {"convae/mse": mse, "convae/ssim_error": ssim}
    scores.update(knn_scores("convae", model, train_images, evaluation.images, wanted))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = type(model)(model.config)
    calibrate(untrained, train_images, layers)
    scores.update(knn_scores("random", untrained, train_images, evaluation.images, wanted))
    scores.update(baseline_scores(train_images, evaluation.images))
    result = {k: auroc(normal, v) for k, v in scores.items() if wanted is None or k in wanted}
    return dict(auroc=result, fit_seconds=fit_seconds, score_seconds=time.perf_counter() - t1, epochs=len(est.history_))


def family(name: str) -> str:
    return name.split("/")[0]


def select(path: Path, dataset: str) -> dict[str, str]:
    """For each family, the scorer with the best mean validation AUROC over the classes in `path`."""
    doc = json.loads(path.read_text())
    runs = [r for r in doc["runs"] if r["dataset"] == dataset]
    if not runs:
        raise SystemExit(f"{path}: no validation runs of {dataset}")
    names = set.intersection(*(set(r["auroc"]) for r in runs))
    means = {n: float(np.mean([r["auroc"][n] for r in runs])) for n in names}
    best = {}
    for n, m in sorted(means.items()):
        f = family(n)
        if f not in best or m > means[best[f]]:
            best[f] = n
    return best


def load(name: str, split: str, data_dir: Path):
    import convae

    train = convae.load_dataset(name, "train", data_dir=data_dir, download=False)
    if split == "test":
        return train, convae.load_dataset(name, "test", data_dir=data_dir, download=False)
    mask = held_out(train.labels)
    return train.subset(~mask), train.subset(mask)


CLASS_NAMES = {
    "mnist": [str(c) for c in range(10)],
    "fashion-mnist": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def markdown(doc: dict, dataset: str) -> str:
    """The test AUROCs of `dataset` as a Markdown table: one row per class and the mean (± the
    standard deviation over seeds where there are several), a column per scorer, Deep SVDD last."""
    runs = [r for r in doc["runs"] if r["dataset"] == dataset]
    if not runs:
        return ""
    names = sorted(set.intersection(*(set(r["auroc"]) for r in runs)), key=lambda n: (n.split("/")[0] != "convae", n))
    classes = sorted({r["class"] for r in runs})
    svdd = DEEP_SVDD.get(dataset)
    head = ["class", *names, *(["Deep SVDD (Ruff et al.)"] if svdd else [])]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    per_class = {n: [] for n in names}

    def cell(values: list[float]) -> str:
        return f"{100 * np.mean(values):.1f}" + (f" ± {100 * np.std(values):.1f}" if len(values) > 1 else "")

    for c in classes:
        cells = []
        for n in names:
            values = [r["auroc"][n] for r in runs if r["class"] == c]
            per_class[n].append(np.mean(values))
            cells.append(cell(values))
        lines.append(
            f"| {CLASS_NAMES[dataset][c]} | " + " | ".join(cells) + (f" | {svdd[c]:.1f}" if svdd else "") + " |"
        )
    seeds = sorted({r["seed"] for r in runs})
    means = []
    for n in names:  # the mean over classes, per seed; its spread is over the seeds
        by_seed = [np.mean([r["auroc"][n] for r in runs if r["seed"] == s]) for s in seeds]
        means.append(f"**{cell(by_seed)}**")
    svdd_mean = f" | **{np.mean([svdd[c] for c in classes]):.1f}**" if svdd else ""
    lines.append("| mean | " + " | ".join(means) + svdd_mean + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--datasets", default="mnist,fashion-mnist,cifar10")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--select", type=Path, help="validation JSON the test run takes its scorers from")
    ap.add_argument("--select-from", help="take the scorers from this dataset's validation runs (default: its own)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (one: spinning threads on shared cores are slow)"
    )
    ap.add_argument("--epochs", type=int, help="override the dataset's training epochs (for trying budgets)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print --out's tables as Markdown, run nothing")
    args = ap.parse_args(argv)
    if args.markdown:
        doc = json.loads(args.out.read_text())
        for name in args.datasets.split(","):
            print(f"### {name}\n\n{markdown(doc, name)}")
        return 0
    if args.split == "test" and args.select is None:
        ap.error("--split test needs --select VALIDATION.json: settings are chosen on validation only")
    import torch

    from convae._io import atomic_write_text

    torch.set_num_threads(args.threads)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    doc["machine"] = dict(
        platform=platform.platform(), cpus=os.cpu_count(), threads=args.threads, torch=torch.__version__,
        python=sys.version.split()[0], date=datetime.date.today().isoformat(),
    )  # fmt: skip
    done = {(r["dataset"], r["class"], r["seed"]) for r in doc["runs"]}
    for name in args.datasets.split(","):
        if args.epochs:
            MODELS[name] = {**MODELS[name], "epochs": args.epochs}
        doc.setdefault("models", {})[name] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in MODELS[name].items()
        }
        # the best of each family, and convae's reconstruction scores (cheap, and what users sort by too)
        chosen = select(args.select, args.select_from or name) if args.select else {}
        wanted = {*chosen.values(), "convae/mse", "convae/ssim_error"} if args.select else None
        train, evaluation = load(name, args.split, args.data_dir)
        for seed, c in itertools.product(map(int, args.seeds.split(",")), map(int, args.classes.split(","))):
            if (name, c, seed) in done:
                continue
            r = one_class(name, train, evaluation, c, seed, wanted)
            doc["runs"].append(dict(dataset=name, split=args.split, **{"class": c}, seed=seed, **r))
            best = max((v, k) for k, v in r["auroc"].items() if k.startswith("convae"))
            print(
                f"{name} class {c} seed {seed}: fit {r['fit_seconds']:.0f} s, best convae {best[1]} {best[0]:.4f}",
                flush=True,
            )
            atomic_write_text(
                args.out, json.dumps(doc, indent=1) + "\n"
            )  # after every class: a killed run keeps its classes
    return 0


if __name__ == "__main__":
    sys.exit(main())
