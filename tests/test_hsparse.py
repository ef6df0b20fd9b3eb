"""arch="hsparse": stages of whitened k-sparse patch coders, trained greedily, on real images."""

import json
import subprocess

import numpy as np
import pytest
import torch

from convae import ConvAutoencoder, tensors
from convae import run as rundir
from convae.analysis import ScoreOptions, find_neighbors, score_images
from convae.config import TrainConfig
from convae.data import load_dataset
from convae.data.containers import ImageData
from convae.errors import ConfigError
from convae.features import FeatureExtractor
from convae.models import ModelConfig, build_model, code_size, hsparse, patches
from convae.models.base import TrainStep
from convae.probe import calibrate, run_probe
from convae.report import card as report_card
from convae.report.build import build_report
from convae.tensors import native_bf16
from convae.train import fit
from convae.views import render_view
from test_presets import CONVAE
from test_train import fit_killed_after_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cifar(shared_datasets):
    """Real CIFAR-10 test images: 1,500 to train on, 500 held out."""
    data = load_dataset("cifar10:test", data_dir=shared_datasets)
    return data.images[:1500], data.labels[:1500], data.images[1500:2000], data.labels[1500:2000]


def _config(filters=(24, 16), size=(32, 32), channels=3, **kw):
    return ModelConfig(arch="hsparse", in_channels=channels, image_size=size, channels=filters, kernel_size=5,
                       reduce_dim=12, **kw)  # fmt: skip


def _float(images):
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def test_layers_shapes_receptive_fields_and_sizes():
    model = build_model(_config(size=(30, 37)))
    assert model.layer_names == ["stage1.conv1", "stage1", "stage2.conv1", "stage2", "bottleneck"]
    assert model.split_layer_names == ["stage1.conv1.split", "stage2.conv1.split"]
    assert model.hierarchy_layers() == ["stage1", "stage2"]
    x = torch.rand(2, 3, 30, 37)
    out = model.forward_intermediates(x, model.feature_layer_names())
    for name, value in out.items():
        assert list(value.shape[1:]) == model.layer_shape(name), name
    # 30x37 -> 26x33 responses -> 13x17 pooled -> 11x15 -> 6x8
    assert model.layer_shape("stage2") == [32, 6, 8] and code_size(model.config) == 16 * 11 * 15
    info = {f.module: f for f in model.feature_info}
    assert [info[n].receptive_field for n in model.layer_names] == [5, 6, 10, 12, 10]
    assert [info[n].reduction for n in model.layer_names] == [1, 2, 2, 4, 2]
    assert model(x).shape == x.shape and model.decode(model.encode(x)).shape == x.shape
    assert model.training_stages() == 2


def test_receptive_field_groups_code_their_channels_of_the_map_below(cifar):
    """--groups: stage 2 is G coders, each over its Gs co-varying channels of stage 1's pooled maps."""
    cfg = _config(filters=(24, 32), groups=4, group_size=8)
    model = build_model(cfg)
    assert model.layer_shape("stage2.conv1") == [32, 12, 12] and model.layer_shape("stage2") == [64, 6, 6]
    train = TrainConfig(epochs=2, batch_size=64, seed=1, device="cpu", val_fraction=0.1)
    trained = fit(cifar[0][:600], cfg, train).model
    members = trained.coders[1].members
    assert members.shape == (4, 8) and all(len(set(m.tolist())) == 8 for m in members)  # 8 distinct channels each
    x = _float(cifar[2][:8])
    assert trained.decode(trained.encode(x)).shape == x.shape
    with pytest.raises(ConfigError, match="split evenly into 5 groups"):
        _config(filters=(24, 32), groups=5)


def test_fused_stage_arithmetic_equals_the_plain_form():
    """The grouped stage's one convolution (normalization moved past the filters, the folded
    filters kept between inference calls) gives each group coder's own responses on its channels,
    also after a weight changes; the pooled sign split equals pooling the plain split map."""
    torch.manual_seed(0)
    model = build_model(_config(filters=(24, 32), groups=4, group_size=8, split_threshold=0.3)).eval()
    grouped = model.coders[1]
    for coder in grouped.group_coders():  # statistics as training would leave them: not the identity
        d = coder.dim
        coder.mean.normal_()
        coder.whiten.copy_(torch.eye(d) + 0.1 * torch.randn(d, d))
        coder.floor.fill_(0.5)
    maps = torch.rand(3, 9, 11, 48)  # (N, H, W, C): stage 1's sign-split pooled channels
    z = grouped.responses(maps)
    plain = torch.cat([c.responses(maps[..., idx]) for c, idx in zip(grouped.group_coders(), grouped.members)], -1)
    assert z.shape == plain.shape == (3, 7, 9, 32)
    torch.testing.assert_close(z, plain, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        # inference convolves in bf16 where the CPU computes it natively: close to fp32, not equal
        low = native_bf16(torch.device("cpu"))
        first = grouped.responses(maps)  # keeps the folded filters ...
        torch.testing.assert_close(grouped.responses(maps), first, rtol=0, atol=0)  # ... and uses them
        if low:
            assert (first - z).abs().mean() < 0.01 * z.std()
        else:
            torch.testing.assert_close(first, z)
        assert grouped._folded_key is not None
        # bf16 maps, as the stage below hands them over in inference: the same channels gathered
        # and the same float32 statistics as from those values in float32
        rounded = maps.bfloat16()
        sub, mean, square = grouped._gathered(rounded)
        want_sub, want_mean, want_square = grouped._gathered(rounded.float())
        assert sub.dtype == torch.bfloat16 and mean.dtype == square.dtype == torch.float32
        assert torch.equal(sub.float(), want_sub)
        torch.testing.assert_close(mean, want_mean)
        torch.testing.assert_close(square, want_square)
        torch.testing.assert_close(grouped.responses(rounded), grouped.responses(rounded.float()))
        grouped.group_coders()[0].filters.mul_(-1)  # ... until a weight changes
        assert not torch.allclose(grouped.responses(maps)[..., :8], first[..., :8], atol=0.1)
    torch.testing.assert_close(model._pooled_split(z), model._pool(model._split(z)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model._pooled_split(z.clone(), consume=True), model._pooled_split(z))


def test_inference_products_in_bf16_where_native_every_layer_float32():
    """In inference mode (extraction) the patch product runs in bf16 where the CPU computes it
    natively: every layer still comes back float32, within bf16's rounding of the fp32 pass, and
    batches are sized by the narrower maps; elsewhere (and under no_grad, as training's stage
    inputs) the pass is the fp32 one exactly."""
    torch.manual_seed(0)
    model = build_model(_config()).eval()
    x = torch.rand(4, 3, 32, 32)
    names = model.feature_layer_names()
    with torch.no_grad():
        full = model.forward_intermediates(x, names)
    with torch.inference_mode():
        fast = model.forward_intermediates(x, names)
    low = native_bf16(torch.device("cpu"))
    for name in names:
        assert fast[name].dtype == torch.float32, name
        if low:
            assert (fast[name] - full[name]).abs().mean() <= 0.01 * full[name].std(), name
        else:
            torch.testing.assert_close(fast[name], full[name], rtol=0, atol=0)
    cpu = torch.device("cpu")
    values = int(np.prod(model.layer_shape("stage1.conv1")))
    assert model.inference_map_bytes("stage1.conv1", cpu) == values * (2 if low else 4)
    assert model.inference_map_bytes("stage1", cpu) == int(np.prod(model.layer_shape("stage1"))) * 4
    grouped = build_model(_config(filters=(24, 32), groups=4, group_size=8))  # its convolution's output is fp32
    assert grouped.inference_map_bytes("stage2.conv1", cpu) == int(np.prod(grouped.layer_shape("stage2.conv1"))) * 4


def test_precision_float32_keeps_every_product_fp32(monkeypatch):
    """FeatureExtractor(precision="float32") (`--precision float32`): the features of a pass with no
    bf16 product anywhere, even on a device that computes bf16 natively (here: made to say so),
    where "auto" multiplies in bf16: close to them, not equal."""
    torch.manual_seed(0)
    model = build_model(_config(filters=(24, 32), groups=4, group_size=8)).eval()
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8).numpy()
    monkeypatch.setattr(tensors, "native_bf16", lambda device: False)
    want = FeatureExtractor(model, "stage1,stage2", "grid2").transform(images)
    monkeypatch.setattr(tensors, "native_bf16", lambda device: True)
    exact = FeatureExtractor(model, "stage1,stage2", "grid2", precision="float32")
    fast = FeatureExtractor(model, "stage1,stage2", "grid2")
    assert not exact.bf16 and fast.bf16
    torch.testing.assert_close(exact.transform(images), want)
    low = fast.transform(images)
    assert not np.allclose(low, want, rtol=1e-5, atol=1e-6)
    assert np.abs(low - want).mean() < 0.01 * want.std()
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, got 'half'"):
        FeatureExtractor(model, "stage1", "grid2", precision="half")


def test_score_and_neighbors_take_a_precision(monkeypatch):
    """`convae score` and `convae neighbors` with precision "float32": the scores and neighbours of
    a pass with no bf16 product, on a device made to report native bf16, where "auto" differs."""
    torch.manual_seed(0)
    model = build_model(_config(filters=(24, 32), groups=4, group_size=8)).eval()
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8).numpy()
    reference, queries = images[:30], images[30:]

    def scored_and_found(precision):
        scores = score_images(model, queries, reference, layers="stage1,stage2", pool="grid2", k=3, precision=precision)
        found = find_neighbors(model, reference, queries, layers="stage2", pool="grid2", k=3, precision=precision)
        return scores.scores, found.neighbours

    monkeypatch.setattr(tensors, "native_bf16", lambda device: False)
    want, want_found = scored_and_found("auto")
    monkeypatch.setattr(tensors, "native_bf16", lambda device: True)
    exact, exact_found = scored_and_found("float32")
    low, _ = scored_and_found("auto")
    for name in want:
        np.testing.assert_array_equal(exact[name], want[name])
    np.testing.assert_array_equal(exact_found.indices, want_found.indices)
    np.testing.assert_array_equal(exact_found.similarity, want_found.similarity)
    assert not np.array_equal(low["knn"], want["knn"])
    with pytest.raises(ConfigError, match="precision must be one of auto, float32"):
        ScoreOptions(precision="half")
    with pytest.raises(ConfigError, match="precision must be one of auto, float32"):
        find_neighbors(model, reference, queries, precision="half")
    with pytest.raises(ConfigError, match="compile must be one of auto, always, never"):
        ScoreOptions(compile="sometimes")
    with pytest.raises(ConfigError, match="compile must be one of auto, always, never"):
        find_neighbors(model, reference, queries, compile="sometimes")


def test_views_take_a_precision(monkeypatch):
    """`convae show` / `report` --precision: a view's passes multiply in bf16 only under "auto" (on a
    device made to report native bf16), every product fp32 under "float32"."""
    torch.manual_seed(0)
    model = build_model(_config(filters=(24, 32), groups=4, group_size=8)).eval()
    data = ImageData(torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8).numpy(), None, None, "noise")
    seen, real = [], model.forward_intermediates

    def recorded(*args, **kwargs):
        seen.append(tensors.bf16_products(torch.device("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward_intermediates", recorded)
    monkeypatch.setattr(tensors, "native_bf16", lambda device: True)
    for precision in ("auto", "float32"):
        seen.clear()
        render_view("maps", model, data=data, layers="stage1,stage2", precision=precision)
        assert seen and set(seen) == {precision == "auto"}, precision
    with pytest.raises(ConfigError, match="precision must be one of auto, float32, got 'half'"):
        render_view("maps", model, data=data, precision="half")


def test_the_groups_seed_correlations_are_the_full_matrixs_rows(monkeypatch):
    """choose_groups reads the seeds' rows of the channels' correlation matrix, computed a few
    rows of the sample at a time: those of the whole sample's matrix, constant channels included."""
    torch.manual_seed(0)
    locations = torch.randn(1000, 40) @ torch.randn(40, 40)
    locations[:, 7] = 3.0  # constant: correlation 0 with every channel, as the clamped deviation gives
    seeds = torch.tensor([7, 0, 39, 12])
    monkeypatch.setattr(patches, "CORRELATION_ROWS", 300)  # chunks of uneven length
    z = locations.double()
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-6)
    want = (z.T @ z / len(z))[seeds]
    torch.testing.assert_close(patches._seed_correlations(locations, seeds), want, rtol=1e-12, atol=1e-12)


def test_statistics_do_not_depend_on_how_many_maps_are_computed_at_once(cifar, monkeypatch):
    """begin_stage computes the sampled maps a few images at a time (memory); the statistics it
    measures (the groups, each group's whitening, the starting filters) are those of one pass."""

    def stage2_statistics(chunk):
        monkeypatch.setattr(hsparse, "_SAMPLE_CHUNK", chunk)
        torch.manual_seed(0)
        model = build_model(_config(filters=(24, 32), groups=4, group_size=8))
        indices = np.arange(300)
        model.begin_stage(0, cifar[0], indices, torch.device("cpu"))
        model.begin_stage(1, cifar[0], indices, torch.device("cpu"))
        return model.coders[1].state_dict()

    whole, chunked = stage2_statistics(256), stage2_statistics(7)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_receptive_box_is_exact_by_gradient():
    """The input pixels that affect a unit are exactly its receptive_box (average pooling and the
    sign split pass a gradient to every pixel of the field, given a small threshold)."""
    torch.manual_seed(0)
    model = build_model(_config(split_threshold=0.0)).eval()
    for layer, (y, x) in [("stage1.conv1", (3, 9)), ("stage1", (4, 2)), ("stage2.conv1", (5, 1)), ("stage2", (2, 3))]:
        inp = torch.rand(1, 3, 32, 32, requires_grad=True)
        out = model.forward_intermediates(inp, [layer])[layer]
        out[0, :, y, x].abs().sum().backward()
        rows, cols = torch.nonzero(inp.grad[0].abs().sum(0) > 0, as_tuple=True)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == model.receptive_box(layer, y, x), layer


def test_invalid_settings_name_the_option():
    with pytest.raises(ConfigError, match="too small for 3 stages"):
        _config(filters=(8, 8, 8), size=(12, 12))
    with pytest.raises(ConfigError, match="pool_size"):
        _config(pool_size=0)
    with pytest.raises(ConfigError, match="sparse_k"):
        _config(filters=(8, 4), sparse_k=5)
    with pytest.raises(ConfigError, match="at least 2 epochs"):
        fit(np.zeros((10, 32, 32, 3), np.uint8), _config(), TrainConfig(epochs=1, device="cpu"))


@pytest.mark.parametrize("grouped", [False, True])
def test_each_stage_trains_alone_and_learning_lowers_its_loss(cifar, grouped):
    """Greedy: stage 1 trains first, then stage 2 with stage 1 frozen; each stage's held-out patch
    loss ends below the same net with random filters (whitening, PCA or groups measured alike)."""
    images = cifar[0]
    cfg = _config(filters=(24, 32), groups=4, group_size=8) if grouped else _config()
    train = TrainConfig(epochs=4, batch_size=64, lr=2e-3, seed=1, device="cpu", val_fraction=0.1)
    result = fit(images, cfg, train)
    untrained = build_model(cfg)
    calibrate(untrained, images, untrained.hierarchy_layers())
    x, g = _float(cifar[2][:200]), torch.Generator()
    for stage in (0, 1):
        losses = [
            m.training_loss(x, x, TrainStep(g.manual_seed(5), "mse", stage)).item() for m in (result.model, untrained)
        ]
        assert losses[0] < 0.95 * losses[1], (stage, losses)


def test_resume_in_the_second_stage_is_exact(cifar, tmp_path):
    images = cifar[0][:600]
    cfg, train = _config(filters=(12, 8)), TrainConfig(epochs=4, batch_size=50, seed=2, device="cpu")
    whole = fit(images, cfg, train, run_dir=tmp_path / "whole")
    fit_killed_after_epoch(3, images, cfg, train, tmp_path / "cut")  # stage 2 has begun at epoch 3
    assert rundir.load_checkpoint(tmp_path / "cut" / rundir.CHECKPOINT_FILE)["stage"] == 1
    resumed = fit(images, cfg, train, run_dir=tmp_path / "cut", resume=True)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_the_second_stage_adds_to_the_first_and_training_beats_random_weights(cifar):
    """On real images, stage 1 + stage 2 features classify better than stage 1's alone, and the
    trained net better than the same net with random filters (a tiny net, 1,500 images)."""
    est = ConvAutoencoder(arch="hsparse", channels=(48, 48), reduce_dim=24, epochs=4, batch_size=64, device="cpu")
    est.fit(cifar[0])
    exact = FeatureExtractor(est.model_, "stage1,stage2", "grid2", precision="float32").transform(cifar[2][:32])
    est.set_params(layers="stage1,stage2", pool="grid2", precision="float32")  # the estimator passes it on
    np.testing.assert_array_equal(est.transform(cifar[2][:32]), exact)
    est.set_params(layers="bottleneck", pool="flatten", precision="auto")
    rows = run_probe(est, (cifar[0], cifar[1]), (cifar[2], cifar[3]), layers="stage1,stage1+stage2",
                     pool="grid2", baselines="random", device="cpu")  # fmt: skip
    acc = {r["features"]: r["accuracy"] for r in rows}
    assert acc["stage1+stage2/grid2"] > acc["stage1/grid2"]
    assert acc["stage1+stage2/grid2"] > acc["random/stage1+stage2/grid2"]


def test_cli_fit_and_views(cifar, tmp_path, monkeypatch):
    data = tmp_path / "images.npy"
    np.save(data, cifar[0][:800])
    run = tmp_path / "run"
    args = ["--arch", "hsparse", "--widths", "16,12", "--reduce-dim", "8", "--epochs", "2", "-q"]
    fitted = subprocess.run([CONVAE, "fit", str(data), "--out", str(run), *args], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert fitted.returncode == 0, fitted.stderr
    config = json.loads((run / "config.json").read_text())["model"]
    assert config["arch"] == "hsparse" and config["channels"] == [16, 12] and config["reduce_dim"] == 8
    for view in ("filters", "patches", "recon"):
        out = tmp_path / f"{view}.png"
        cmd = [CONVAE, "show", str(run), str(data), "--view", view, "--max-images", "200", "-o", str(out), "-q",
               "--precision", "float32" if view == "patches" else "auto"]  # fmt: skip
        shown = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert shown.returncode == 0, shown.stderr
    out = tmp_path / "features.npy"
    cmd = [CONVAE, "extract", str(run), str(data), "-o", str(out), "--layers", "stage1,stage2", "--pool", "grid2",
           "--precision", "float32", "-q"]  # fmt: skip
    extracted = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert extracted.returncode == 0, extracted.stderr
    model, _ = rundir.load_model(run)
    want = FeatureExtractor(model, "stage1,stage2", "grid2", precision="float32").transform(cifar[0][:800])
    np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-5)
    # the report's precision reaches its model card's reconstruction metrics, computed outside any view
    seen, evaluate = [], report_card.evaluate
    monkeypatch.setattr(tensors, "native_bf16", lambda device: True)
    monkeypatch.setattr(
        report_card, "evaluate", lambda *a, **k: seen.append(tensors.bf16_products(a[3])) or evaluate(*a, **k)
    )
    sample = ImageData(cifar[0][:48], cifar[1][:48], None, "cifar")
    page, _, _ = build_report(run, sample, max_images=48, tsne_points=24, maximize_steps=1, precision="float32")
    assert seen == [False] and "(precision float32)" in page
