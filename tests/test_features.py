"""Feature extraction: every layer and pooling, the file writer, its resume after a real kill, flat memory."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convae.data import load_dataset
from convae.errors import ConfigError
from convae.features import (
    POOLS,
    FeatureExtractor,
    extract_to_file,
    layer_table,
    partial_paths,
    plan_blocks,
    pooled_shape,
)
from convae.features import extractor as extractor_module
from convae.models import ModelConfig, build_model
from convae.tensors import weights_key

CONVAE = shutil.which("convae", path=str(Path(sys.executable).parent)) or "convae"

CONFIGS = {
    "conv-odd": ModelConfig(in_channels=3, image_size=(13, 10), channels=(4, 8), convs_per_stage=1),
    "conv-latent": ModelConfig(image_size=(16, 16), channels=(4, 8), convs_per_stage=2, latent_channels=3),
    "conv-dense-code": ModelConfig(image_size=(12, 12), channels=(4, 8), bottleneck="dense", latent_dim=6),
    "dense": ModelConfig(arch="dense", image_size=(8, 8), hidden=(20, 10), latent_dim=5),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_model(CONFIGS[name]).eval()


def _images(cfg: ModelConfig, n=5, seed=0):
    h, w = cfg.image_size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, cfg.in_channels), dtype=np.uint8)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_layer_and_pooling_has_the_announced_shape_and_names(name, pool):
    model = _model(name)
    images = _images(model.config)
    for layer in model.feature_layer_names():
        ex = FeatureExtractor(model, layer, pool, batch_size=2)
        feats = ex.transform(images)
        expected = int(np.prod(pooled_shape(model.layer_shape(layer), pool)))
        assert feats.shape == (5, expected) and feats.dtype == np.float32
        assert ex.dim == expected and np.isfinite(feats).all()
        names = ex.feature_names
        assert len(names) == expected == len(set(names))
        assert all(n.startswith(f"{layer}/{pool}/c") for n in names)


def test_poolings_compute_what_they_say():
    model = _model("conv-latent")
    x = torch.from_numpy(_images(model.config)).permute(0, 3, 1, 2).float() / 255
    maps = model.forward_intermediates(x, ["stage1", "stage2"])
    s1, s2 = maps["stage1"], maps["stage2"]  # (5, 4, 8, 8) and (5, 8, 4, 4)

    def feats(layer, pool):
        return FeatureExtractor(model, layer, pool)(x)

    torch.testing.assert_close(feats("stage1", "flatten"), s1.flatten(1))
    torch.testing.assert_close(feats("stage1", "avg"), s1.mean((2, 3)))
    torch.testing.assert_close(feats("stage1", "max"), s1.amax((2, 3)))
    quadrants = s1.unflatten(2, (2, 4)).unflatten(4, (2, 4)).mean((3, 5))  # 2x2 cells of 4x4 pixels
    torch.testing.assert_close(feats("stage1", "grid2"), quadrants.flatten(1))
    # a 4x4 map under grid4 is its own grid
    torch.testing.assert_close(feats("stage2", "grid4"), s2.flatten(1))
    assert FeatureExtractor(model, "stage2", "grid4").feature_names[:2] == [
        "stage2/grid4/c0_g0_0",
        "stage2/grid4/c0_g0_1",
    ]
    assert FeatureExtractor(model, "stage2", "flatten").feature_names[5] == "stage2/flatten/c0_y1_x1"


def test_a_sign_split_is_the_blocks_normalized_pre_activation_thresholded_both_ways():
    model = _model("conv-latent")
    assert model.split_layer_names == [
        "stage1.conv1.split",
        "stage1.conv2.split",
        "stage2.conv1.split",
        "stage2.conv2.split",
    ]
    assert model.feature_layer_names()[:3] == ["stage1.conv1", "stage1.conv1.split", "stage1.conv2"]
    x = torch.from_numpy(_images(model.config)).permute(0, 3, 1, 2).float() / 255
    block = model.encoder["stage1"].conv2
    pre = []
    block[1].register_forward_hook(lambda m, args, out: pre.append(out.clone()))  # before the in-place ReLU
    plain = FeatureExtractor(model, "stage1.conv2", "flatten")(x)
    z = pre[-1]  # (5, 4, 16, 16), batch-normalized with the running statistics
    both = FeatureExtractor(model, "stage1.conv2,stage1.conv2.split", "flatten")
    assert model.layer_shape("stage1.conv2.split") == [8, 16, 16]
    assert [b.shape for b in both.blocks] == [(4, 16, 16), (8, 16, 16)]
    feats = both(x)
    expected = torch.cat([torch.relu(z - 0.5), torch.relu(-z - 0.5)], dim=1)
    torch.testing.assert_close(feats[:, 4 * 256 :], expected.flatten(1))
    torch.testing.assert_close(feats[:, : 4 * 256], plain)  # the block's own output is untouched
    assert (expected > 0).float().mean() < (plain > 0).float().mean()  # sparser than the ReLU output
    # the split is taken inside the block: nothing after the block's normalization runs
    calls = []
    block[2].register_forward_hook(lambda *a: calls.append("relu"))
    FeatureExtractor(model, "stage1.conv2.split", "avg")(x)
    assert calls == []
    assert FeatureExtractor(model, "all", "avg").layers == model.layer_names  # `all` leaves splits out
    assert _model("dense").split_layer_names == []
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) fc1.split"):
        plan_blocks(_model("dense"), "fc1.split")
    with pytest.raises(ConfigError, match=r"unknown layer\(s\) stage1.split"):
        plan_blocks(model, "stage1.split")


def test_grid_on_a_map_smaller_than_the_grid_keeps_the_map():
    model = _model("conv-odd")  # stage2 is 4x3
    assert pooled_shape([8, 4, 3], "grid4") == (8, 4, 3)
    assert pooled_shape([8, 4, 3], "grid2") == (8, 2, 2)
    assert pooled_shape([6], "grid4") == pooled_shape([6], "flatten") == (6,)
    assert FeatureExtractor(model, "stage2", "grid4").dim == 8 * 4 * 3


def test_blocks_concatenate_in_network_order_whatever_the_request_order():
    model = _model("conv-latent")
    images = _images(model.config)
    both = FeatureExtractor(model, "bottleneck,stage1", "grid2,avg")
    assert [b.name for b in both.blocks] == ["stage1/avg", "stage1/grid2", "bottleneck/avg", "bottleneck/grid2"]
    feats = both.transform(images)
    as_lists = FeatureExtractor(model, ["stage1", "bottleneck"], ["avg", "grid2"])
    np.testing.assert_array_equal(feats, as_lists.transform(images))
    for block in both.blocks:
        alone = FeatureExtractor(model, block.layer, block.pool).transform(images)
        np.testing.assert_allclose(feats[:, block.columns], alone, rtol=1e-6, atol=1e-6)
    assert FeatureExtractor(model, "all", "avg").layers == model.layer_names


def test_the_forward_pass_stops_after_the_deepest_requested_layer():
    model = _model("conv-latent")
    calls = []
    model.encoder["stage2"].conv1.register_forward_hook(lambda *a: calls.append("stage2.conv1"))
    FeatureExtractor(model, "stage1.conv2,stage1", "avg").transform(_images(model.config))
    assert calls == []
    FeatureExtractor(model, "stage2", "avg").transform(_images(model.config))
    assert calls == ["stage2.conv1"]


def test_the_default_batch_keeps_the_largest_map_under_the_allocators_reuse_limit():
    """On CPU a batch's largest map stays under 24 MiB (glibc serves it from reused heap
    memory, not fresh page-faulted pages); the batch never changes the features."""
    from convae.models import default_model_config

    def default_batch(cfg, layers="bottleneck"):
        return FeatureExtractor(build_model(cfg), layers, "avg").batch_size

    assert default_batch(default_model_config((28, 28, 1))) == 248  # 32 x 28 x 28 floats an image
    assert default_batch(default_model_config((28, 28, 1)), "stage1.conv1.split") == 120  # twice the channels
    assert default_batch(default_model_config((32, 32, 3))) == 96  # 64 x 32 x 32
    assert default_batch(default_model_config((32, 32, 3), channels=(256, 128, 256))) == 24
    assert default_batch(default_model_config((8, 8, 1))) == 256  # small maps: the cap
    assert default_batch(CONFIGS["dense"]) == 256
    # maps of MBs an image: batches under 8 (the sparse model's split maps: 2.9x the rate of 8)
    assert default_batch(default_model_config((32, 32, 3), channels=(1024, 8)), "stage1.conv1.split") == 3
    assert default_batch(default_model_config((256, 256, 3), channels=(128, 8))) == 1
    wide = build_model(default_model_config((32, 32, 3), channels=(256, 8))).eval()
    images = _images(wide.config, n=30)
    auto = FeatureExtractor(wide, "stage1.conv1.split,bottleneck", "grid2")
    assert auto.batch_size == 8
    np.testing.assert_allclose(
        auto.transform(images),
        FeatureExtractor(wide, "stage1.conv1.split,bottleneck", "grid2", batch_size=7).transform(images),
        rtol=1e-5,
        atol=1e-5,
    )


def _grouped_hsparse():
    torch.manual_seed(0)
    config = ModelConfig(arch="hsparse", in_channels=3, image_size=(32, 32), channels=(24, 32), kernel_size=5,
                         groups=4, group_size=8)  # fmt: skip
    return build_model(config).eval()


def test_a_compiled_extraction_gives_the_uncompiled_features(shared_datasets):
    """compile="always": the forward pass through torch.compile (inductor, a real compile) gives
    the uncompiled pass's features up to float rounding, with fp32 products and with bf16 ones
    where native; 50 images in batches of 8 end with a short batch (padded to the compiled shape).
    The fp32 extractor comes second on the same model: nothing compiled for the first (bf16
    where native) may be reused by it (its features are the uncompiled fp32 ones)."""
    images = load_dataset("cifar10:test", data_dir=shared_datasets).images[:50]
    model = _grouped_hsparse()
    for precision in ("auto", "float32"):
        plain = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, precision=precision, compile="never")
        fast = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, precision=precision, compile="always")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the extractor's warning that compiling failed
            want, got = plain.transform(images), fast.transform(images)
        assert got.shape == want.shape == (50, plain.dim)
        if precision == "float32" or not plain.bf16:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        else:  # fused bf16 arithmetic rounds at other places than op by op
            assert np.abs(got - want).mean() < 0.002 * want.std()


def test_a_compiled_hierarchical_model_compiles_once_not_again_on_its_second_batch():
    """The grouped stage's folded-weights cache fills on the first batch; dynamo guarded on that
    attribute, so the second batch compiled the stage again (4-9 s for a preset's model). The
    lookup runs uncompiled: the graphs made by the first batch serve every later one."""
    from torch._dynamo.utils import counters

    model = _grouped_hsparse()
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    ex = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="always")
    torch.compiler.reset()  # graphs compiled by earlier tests for a model of this shape would serve it
    counters.clear()
    ex.transform(images[:8])
    first = counters["stats"]["unique_graphs"]
    ex.transform(images)
    assert first > 0 and counters["stats"]["unique_graphs"] == first


def test_many_models_compiled_in_one_process_all_run_compiled():
    """dynamo compiles a function again for each model it meets, and past its recompile limit (8)
    runs it uncompiled, saying so only in a log record: a process that extracts with more models
    than that (a probe with baselines and compared runs, the roofline) stays under the extractor's
    limit."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(handler)
    try:
        images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        for seed in range(12):
            torch.manual_seed(seed)
            model = _grouped_hsparse()
            FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="always").transform(images)
    finally:
        dynamo_log.removeHandler(handler)
    assert not [r for r in records if "recompile_limit" in r.getMessage()]


def _recording_compile(shapes: list, compiles: list | None = None):
    """A stand-in for torch.compile that records the shapes its function is called with (and each compile)."""

    def compile(fn, **settings):
        assert settings == {"dynamic": False, "options": {"freezing": True}}
        if compiles is not None:
            compiles.append(fn)

        def compiled(x):
            shapes.append(tuple(x.shape))
            return fn(x)

        return compiled

    return compile


def test_compile_auto_compiles_large_extractions_once_and_pads_the_short_last_batch(monkeypatch):
    """ "auto" compiles for an extraction of AUTO_COMPILE_IMAGES images or more, once for every later
    call; the compiled function only ever sees full batches; "never" never compiles."""
    shapes: list = []
    monkeypatch.setattr(torch, "compile", _recording_compile(shapes))
    monkeypatch.setattr(extractor_module, "AUTO_COMPILE_IMAGES", 20)
    model = _grouped_hsparse()
    images = np.random.default_rng(0).integers(0, 256, (21, 32, 32, 3), dtype=np.uint8)
    want = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="never").transform(images)
    auto = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8)
    np.testing.assert_array_equal(auto.transform(images[:19]), want[:19])
    assert shapes == []  # 19 images: below the threshold
    np.testing.assert_array_equal(auto.transform(images), want)
    assert shapes == [(8, 3, 32, 32)] * 3  # 8 + 8 + 5 padded to 8
    np.testing.assert_array_equal(auto.transform(images[:3]), want[:3])  # compiled already: used
    assert len(shapes) == 4
    FeatureExtractor(model, "stage1", "grid2", batch_size=8, compile="never").transform(images)
    assert len(shapes) == 4
    with pytest.raises(ConfigError, match="compile must be one of auto, always, never, got 'yes'"):
        FeatureExtractor(model, "stage1", "grid2", compile="yes")


def test_a_compiled_extraction_is_compiled_again_when_the_weights_change(monkeypatch):
    """Freezing makes the weights constants of the compiled code: after an in-place change to them
    (an optimizer step, load_state_dict) the next batch compiles again, so the features are the
    new weights'."""
    shapes: list = []
    compiles: list = []
    monkeypatch.setattr(torch, "compile", _recording_compile(shapes, compiles))
    model = _grouped_hsparse()
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ex = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="always")
    keys = []
    monkeypatch.setattr(extractor_module, "weights_key", lambda m: keys.append(1) or weights_key(m))
    ex.transform(images)
    ex.transform(images)
    assert len(compiles) == 1
    assert len(keys) == 2  # once an extraction, not once a batch
    with torch.no_grad():
        model.coders[0].filters.mul_(-1.0)
    changed = ex.transform(images)
    assert len(compiles) == 2
    want = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="never").transform(images)
    np.testing.assert_array_equal(changed, want)


def test_a_failed_compile_warns_once_and_extracts_uncompiled(monkeypatch):
    """Where torch.compile fails (no C++ compiler, an unsupported op), the features come from the
    uncompiled pass, with one RuntimeWarning that says so, and no compile is tried again."""
    calls = []

    def failing(fn, **settings):
        def compiled(x):
            calls.append(len(x))
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return compiled

    monkeypatch.setattr(torch, "compile", failing)
    model = _grouped_hsparse()
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    want = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="never").transform(images)
    ex = FeatureExtractor(model, "stage1,stage2", "grid2", batch_size=8, compile="always")
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no working C\\+\\+ compiler.*without it"):
        got = ex.transform(images)
    np.testing.assert_array_equal(got, want)
    assert calls == [8]
    np.testing.assert_array_equal(ex.transform(images), want)
    assert calls == [8]


def test_running_out_of_memory_in_a_compiled_batch_is_raised_not_taken_for_a_failed_compile(monkeypatch):
    def out_of_memory(fn, **settings):
        def compiled(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return compiled

    monkeypatch.setattr(torch, "compile", out_of_memory)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ex = FeatureExtractor(_grouped_hsparse(), "stage1", "grid2", batch_size=4, compile="always")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "torch.compile failed" warning
        with pytest.raises(torch.OutOfMemoryError):
            ex.transform(images)
    assert not ex._compile_failed


def test_unknown_layers_and_poolings_list_the_valid_names():
    model = _model("conv-odd")
    with pytest.raises(
        ConfigError,
        match=r"unknown layer\(s\) stage9: choose from all, stage1.conv1, stage1.conv1.split, stage1, stage2.conv1",
    ):
        plan_blocks(model, "stage1,stage9")
    with pytest.raises(ConfigError, match="unknown pooling grid3: choose from flatten, avg, max, grid2, grid4"):
        plan_blocks(model, "stage1", "grid3")
    with pytest.raises(ConfigError, match="images are 8x8x3"):
        FeatureExtractor(model).transform(np.zeros((2, 8, 8, 3), np.uint8))


def test_layer_table_gives_channels_stride_receptive_field_and_sizes():
    rows = {r["layer"]: r for r in layer_table(_model("conv-latent"))}
    assert rows["stage1"] == dict(
        layer="stage1",
        shape="4x8x8",
        channels=4,
        stride=2,
        receptive_field=rows["stage1"]["receptive_field"],
        flatten=256,
        avg=4,
        max=4,
        grid2=16,
        grid4=64,
    )
    assert rows["bottleneck"]["flatten"] == 3 * 4 * 4
    dense = {r["layer"]: r for r in layer_table(_model("dense"))}
    assert dense["fc1"]["stride"] == "-" and dense["fc1"]["grid4"] == 20


# -- files -------------------------------------------------------------------------------------
def test_extract_writes_npy_with_labels_and_npz_with_both(tmp_path):
    model = _model("conv-latent")
    images = _images(model.config, n=37)
    labels = np.arange(37) % 3
    ex = FeatureExtractor(model, "stage1,bottleneck", "avg,grid2", batch_size=8)
    expected = ex.transform(images)

    res = extract_to_file(ex, images, tmp_path / "f.npy", labels=labels)
    np.save(tmp_path / "saved.npy", expected)
    assert (tmp_path / "f.npy").read_bytes() == (tmp_path / "saved.npy").read_bytes()  # what np.save writes
    (tmp_path / "saved.npy").unlink()
    np.testing.assert_array_equal(np.load(tmp_path / "f.labels.npy"), labels)
    assert res.shape == expected.shape and res.resumed_from == 0 and res.labels_path == tmp_path / "f.labels.npy"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "f.index.csv",
        "f.labels.npy",
        "f.npy",
    ]  # no partial files left

    extract_to_file(ex, images, tmp_path / "g.npz", labels=labels, dtype="float16")
    with np.load(tmp_path / "g.npz") as z:
        assert sorted(z.files) == ["features", "labels"]
        assert z["features"].dtype == np.float16
        np.testing.assert_array_equal(z["features"], expected.astype(np.float16))
        np.testing.assert_array_equal(z["labels"], labels)

    with pytest.raises(ConfigError, match=r"name it \.npy"):
        extract_to_file(ex, images, tmp_path / "f.csv")
    with pytest.raises(ConfigError, match="dtype"):
        extract_to_file(ex, images, tmp_path / "f.npy", dtype="int8")


def test_a_partial_file_from_other_options_is_started_anew(tmp_path):
    model = _model("conv-latent")
    images = _images(model.config, n=20)
    out = tmp_path / "f.npy"
    partial, progress = partial_paths(out)
    np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(20, 4))[:] = 7
    progress.write_text(json.dumps({"fingerprint": "another model", "rows_done": 12, "rows": 20}))
    ex = FeatureExtractor(model, "stage1", "avg", batch_size=8)
    res = extract_to_file(ex, images, out)
    assert res.resumed_from == 0
    np.testing.assert_array_equal(np.load(out), ex.transform(images))
    assert not partial.exists() and not progress.exists()


_KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from safetensors.torch import load_file
    from convae.features import FeatureExtractor, extract_to_file
    from convae.models import ModelConfig, build_model

    class SlowImages:  # an image source as slow as decoding files, so the kill lands mid-way
        def __init__(self, arr):
            self.arr, self.shape = arr, arr.shape
        def __len__(self):
            return len(self.arr)
        def __getitem__(self, i):
            time.sleep(0.002)
            return self.arr[i]

    model = build_model(ModelConfig(image_size=(16, 16), channels=(4, 8), convs_per_stage=2, latent_channels=3))
    model.load_state_dict(load_file(sys.argv[1]))
    images = np.load(sys.argv[2])
    ex = FeatureExtractor(model, "stage1,bottleneck", "grid2", batch_size=32)
    extract_to_file(ex, SlowImages(images), sys.argv[3], labels=np.load(sys.argv[4]), source="synthetic", workers=0)
    """
)


def test_an_extraction_killed_with_sigkill_resumes_to_the_same_file(tmp_path):
    model = _model("conv-latent")
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    images = _images(model.config, n=1500, seed=1)
    labels = np.arange(1500) % 10
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "extract.py").write_text(_KILLED_SCRIPT)
    out = tmp_path / "killed.npy"
    partial, progress = partial_paths(out)

    proc = subprocess.Popen(
        [
            sys.executable,
            tmp_path / "extract.py",
            tmp_path / "w.safetensors",
            tmp_path / "images.npy",
            out,
            tmp_path / "labels.npy",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            state = json.loads(progress.read_text()) if progress.exists() else {}
            if state.get("rows_done", 0) > 0:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the extraction ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists() and not out.exists()  # never a half-written OUT.npy
    done = json.loads(progress.read_text())["rows_done"]
    assert 0 < done < 1500

    ex = FeatureExtractor(model, "stage1,bottleneck", "grid2", batch_size=32)
    res = extract_to_file(ex, images, out, labels=labels, source="synthetic")
    assert res.resumed_from == done
    extract_to_file(ex, images, tmp_path / "whole.npy", labels=labels, source="synthetic")
    assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert (tmp_path / "killed.labels.npy").read_bytes() == (tmp_path / "whole.labels.npy").read_bytes()
    assert not partial.exists() and not progress.exists()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_growth(work) -> int:
    """Largest rise of this process's resident memory while `work()` runs, sampled every 2 ms."""
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        work()
    finally:
        done.set()
        thread.join()
    return peak[0]


def test_memory_stays_flat_on_a_large_memmapped_dataset(tmp_path):
    n = 12_000
    images = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 16, 16, 1))
    rng = np.random.default_rng(0)
    for s in range(0, n, 2000):
        images[s : s + 2000] = rng.integers(0, 256, (2000, 16, 16, 1), dtype=np.uint8)
    images.flush()
    del images
    images = np.load(tmp_path / "big.npy", mmap_mode="r")
    torch.manual_seed(0)
    model = build_model(ModelConfig(image_size=(16, 16), channels=(4,), convs_per_stage=1)).eval()
    # compiled, as an extraction this size runs by default; the warm-up compiles
    ex = FeatureExtractor(model, "stage1.conv1", "flatten", batch_size=256, compile="always")  # 1024 floats an image
    out_bytes = n * ex.dim * 4  # 49 MB of features
    ex.transform(images[:512])  # warm up torch's allocator

    tracemalloc.start()  # every numpy and Python allocation
    try:
        extract_to_file(ex, images, tmp_path / "f.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < out_bytes / 20, f"peak {peak / 1e6:.1f} MB for {out_bytes / 1e6:.0f} MB of features"
    # resident memory too (torch's buffers included; the file's pages stay in the page cache)
    growth = _peak_rss_growth(lambda: extract_to_file(ex, images, tmp_path / "h.npz"))
    assert growth < out_bytes / 2, f"resident memory grew {growth / 1e6:.1f} MB for {out_bytes / 1e6:.0f} MB"

    feats = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert feats.shape == (n, ex.dim)
    # batched otherwise: the compiled kernels' rounding depends on an image's place in its batch
    np.testing.assert_allclose(feats[-300:], ex.transform(images[-300:]), rtol=1e-5, atol=1e-6)
    with np.load(tmp_path / "h.npz") as z:
        np.testing.assert_array_equal(z["features"][:300], feats[:300])


# -- the command line --------------------------------------------------------------------------
def convae(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([CONVAE, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from convae.estimator import ConvAutoencoder

    run = tmp_path_factory.mktemp("features") / "run"
    train = load_dataset("digits", "train")
    ConvAutoencoder(epochs=1, channels=(4, 8), batch_size=64, seed=0).fit(train.images, run_dir=run, data_spec="digits")
    return run


def test_cli_layers_lists_every_layer_and_the_size_of_each_pooling(digits_run):
    proc = convae("layers", digits_run)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["layer", "shape", "channels", "stride", "receptive_field", *POOLS]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert list(rows) == [
        "stage1.conv1",
        "stage1.conv1.split",
        "stage1",
        "stage2.conv1",
        "stage2.conv1.split",
        "stage2",
        "bottleneck",
    ]
    assert rows["stage1"][1:] == ["4x4x4", "4", "2", "4", "64", "4", "4", "16", "64"]
    assert rows["stage1.conv1.split"][1:] == ["8x8x8", "8", "1", "3", "512", "8", "8", "32", "128"]


def test_cli_extract_writes_npy_with_labels_or_npz(digits_run, tmp_path):
    proc = convae(
        "extract",
        digits_run,
        "digits:test",
        "-o",
        tmp_path / "f.npy",
        "--layers",
        "stage1,bottleneck",
        "--pool",
        "avg",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    assert "360 x 12 float32 (stage1/avg, bottleneck/avg)" in proc.stdout
    assert np.load(tmp_path / "f.npy").shape == (360, 12)
    assert np.load(tmp_path / "f.labels.npy").shape == (360,)
    # --compile always: the same features through torch.compile (360 images: "auto" would not)
    args = ("--layers", "stage1,bottleneck", "--pool", "avg", "-q", "--compile", "always")
    proc = convae("extract", digits_run, "digits:test", "-o", tmp_path / "c.npy", *args)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), np.load(tmp_path / "f.npy"), rtol=1e-4, atol=1e-5)

    partial, progress = partial_paths(tmp_path / "g.npz")
    proc = convae(
        "extract", digits_run, "digits:test", "-o", tmp_path / "g.npz", "--layers", "all", "--pool", "grid2", "-q"
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "g.npz") as z:
        assert z["features"].shape[0] == 360 and z["labels"].shape == (360,)
    assert not partial.exists() and not progress.exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--layers", "stage7"], "unknown layer(s) stage7: choose from all, stage1.conv1"),
        (["--pool", "median"], "unknown pooling median"),
        (["-o", "features.csv"], "name it .npy"),
        (["--batch-size", "0"], "batch size must be at least 1"),
    ],
)
def test_cli_extract_user_errors_are_one_line_with_exit_code_2(digits_run, tmp_path, args, fragment):
    base = ["extract", digits_run, "digits:test", "-o", "f.npy", "-q"]
    proc = convae(*base, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convae: error:") and fragment in lines[0], proc.stderr


def test_cli_extract_of_a_missing_run_is_a_user_error(tmp_path):
    proc = convae("extract", tmp_path / "nope", "digits", "-o", tmp_path / "f.npy")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_feature_codes_hold_each_column_in_8_bits_of_its_range():
    """FeatureCodes: a column's range on the sample widened by half of it each way (never below
    zero for a column never negative there), 255 steps; values within a half step once decoded,
    values past the range clipped to it; a column constant there: its value code 0, steps of 1."""
    from convae.features import FeatureCodes

    rng = np.random.default_rng(0)
    sample = np.stack([rng.exponential(2.0, 500), rng.normal(-3.0, 1.0, 500), np.full(500, 7.0)], axis=1)
    codes = FeatureCodes.fitted(sample)
    lo, hi = sample.min(0), sample.max(0)
    assert codes.low[0] == 0.0 and codes.low[1] == pytest.approx(lo[1] - (hi[1] - lo[1]) / 2, rel=1e-6)
    np.testing.assert_allclose(codes.low[:2] + 255 * codes.step[:2], hi[:2] + (hi[:2] - lo[:2]) / 2, rtol=1e-5)
    rows = np.concatenate([sample[:50], [[-1.0, 100.0, 7.0], [1e6, -1e6, 8.0]]]).astype(np.float32)
    out = np.empty(rows.shape, np.uint8)
    codes.encode(rows, out)
    back = codes.decode(out)
    assert np.all(np.abs(back[:50, :2] - rows[:50, :2]) <= codes.step[:2] * 0.5 + 1e-5)
    assert out[50, 0] == 0 and out[50, 1] == 255 and out[51, 0] == 255 and out[51, 1] == 0  # clipped
    assert np.all(out[:51, 2] == 0) and np.all(back[:51, 2] == 7.0) and back[51, 2] == 8.0  # a step of 1
    strided = np.zeros((52, 6), np.uint8)[:, ::2]  # not contiguous: written through numpy
    codes.encode(rows, strided)
    np.testing.assert_array_equal(strided, out)
    # a narrow range far from zero (|low / step| ~ 1e7): float32's x / step would miss the codes
    offset = np.concatenate([sample[:, :1], 1000.0 + sample[:, :1] * 1e-4], axis=1)
    far = FeatureCodes.fitted(offset)
    rows_far = offset[:50].astype(np.float32)
    codes_far = np.empty(rows_far.shape, np.uint8)
    far.encode(rows_far, codes_far)
    exact = np.clip(np.rint((rows_far.astype(np.float64) - far.low) / far.step), 0, 255)
    assert np.abs(codes_far - exact).max() <= 1 and np.mean(codes_far == exact) > 0.99  # a tie may go up
    with pytest.raises(ConfigError, match="at least one row"):
        FeatureCodes.fitted(np.zeros((0, 3)))
    rows[7, 1] = np.nan
    with pytest.raises(ConfigError, match="NaN or infinite"):
        codes.encode(rows, out)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        FeatureCodes.fitted(rows)
