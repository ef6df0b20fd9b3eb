"""Views: the numbers behind the pictures (receptive-field crops, activation maximization), and
that every view renders a readable PNG for grayscale, RGB, tiny and larger images and the dense model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from convae import ConvAutoencoder
from convae import views as V
from convae.data import ImageData, load_dataset
from convae.errors import ConfigError, ConvaeError
from convae.tensors import to_float_nchw
from convae.views.filters import _filter_tile
from convae.views.maximize import _channel_activation
from convae.views.patches import _interior_mask, _patch_canvas


def fit(images, run_dir, **settings):
    settings = {"epochs": 2, "batch_size": 128, "device": "cpu", "seed": 0, **settings}
    return ConvAutoencoder(**settings).fit(images, run_dir=run_dir)


@pytest.fixture(scope="module")
def digits(one_thread):
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def conv(digits, tmp_path_factory):
    return fit(digits[0].images, tmp_path_factory.mktemp("vis") / "conv", channels=(8, 16)).model_


@pytest.fixture(scope="module")
def dense(digits, tmp_path_factory):
    return fit(
        digits[0].images, tmp_path_factory.mktemp("vis") / "dense", arch="dense", hidden=(32,), latent_dim=8
    ).model_


@pytest.fixture(scope="module")
def rgb(tmp_path_factory, one_thread):
    """32x32 colour images without labels, from a real .npy file: colour gradients and blobs."""
    rng = np.random.default_rng(0)
    n, size = 160, 32
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        a, b = rng.uniform(-1, 1, 2)
        base = (a * xx + b * yy + 1) / 2
        colour = rng.uniform(0, 1, 3)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        images[i] = base[..., None] * colour + blob[..., None] * (1 - colour)
    path = tmp_path_factory.mktemp("rgb") / "rgb.npy"
    np.save(path, (np.clip(images, 0, 1) * 255).astype(np.uint8))
    data = load_dataset(path)
    model = fit(data.images, path.parent / "run", channels=(8, 16), epochs=1, batch_size=32).model_
    return model, data


def png_ok(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert min(arr.shape[:2]) > 100
    assert arr.std() > 10  # not blank
    return arr


# ---------------------------------------------------------------------------------------------
# receptive-field crops
# ---------------------------------------------------------------------------------------------
def test_top_patches_are_the_units_exact_receptive_field(conv, digits):
    images = digits[1].images
    results = V.top_patches(conv, images, "all", channels=3, k=4)
    assert [r.layer for r in results] == conv.layer_names
    x = to_float_nchw(images)
    with torch.inference_mode():
        acts = conv.forward_intermediates(x, conv.layer_names)
    rng = np.random.default_rng(0)
    for lp in results:
        a = acts[lp.layer].numpy()
        mask = _interior_mask(conv, lp.layer)
        allowed = np.ones(a.shape[2] * a.shape[3], bool) if mask is None else mask.numpy()
        assert lp.channels == list(
            np.argsort(-a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1).var(1), kind="stable")[:3]
        )
        for c, row in zip(lp.channels, lp.patches):
            per_image = a[:, c].reshape(len(a), -1)[:, allowed].max(1)
            # the k best images, best first, with the value the unit really has there
            np.testing.assert_allclose([p.activation for p in row], np.sort(per_image)[::-1][:4], rtol=1e-5, atol=1e-6)
            for p in row:
                assert p.activation == pytest.approx(float(a[p.index, c, p.y, p.x]), rel=1e-5, abs=1e-6)
                assert p.box == conv.receptive_box(lp.layer, p.y, p.x)
                top, left, bottom, right = p.box
                crop = V.crop_patch(images[p.index], p.box)
                np.testing.assert_array_equal(crop, images[p.index][top:bottom, left:right])
                if mask is not None:  # an interior unit: the whole field, unclipped
                    assert crop.shape[:2] == (lp.receptive_field, lp.receptive_field)
            # Pixels outside the box cannot change the unit; pixels inside do.
            best = row[0]
            top, left, bottom, right = best.box
            image = images[best.index].copy()
            outside = image.copy()
            noise = rng.integers(0, 256, image.shape, dtype=np.uint8)
            keep = np.zeros(image.shape[:2], bool)
            keep[top:bottom, left:right] = True
            outside[~keep] = noise[~keep]
            inside = image.copy()
            inside[keep] = noise[keep]
            with torch.inference_mode():
                out = conv.forward_intermediates(to_float_nchw(np.stack([image, outside, inside])), [lp.layer])[
                    lp.layer
                ]
            unit = out[:, c, best.y, best.x].numpy()
            assert unit[1] == pytest.approx(unit[0], abs=1e-5)
            if bottom - top < images.shape[1] or right - left < images.shape[2]:
                assert abs(unit[2] - unit[0]) > 1e-4


def test_a_clipped_field_keeps_its_place_on_the_canvas(conv):
    layer = "stage1"
    rf = conv.layer_info(layer)["receptive_field"]
    box = conv.receptive_box(layer, 0, 0)  # the corner unit: its field starts above and left of the image
    assert box[0] == 0 and box[1] == 0 and box[2] < rf
    crop = np.ones((box[2] - box[0], box[3] - box[1], 3), np.float32)
    canvas = _patch_canvas(crop, box, rf, (8, 8))
    assert canvas.shape[:2] == (rf, rf)
    off = rf - crop.shape[0]
    np.testing.assert_allclose(canvas[:off], np.broadcast_to(V.OUTSIDE, canvas[:off].shape))
    np.testing.assert_allclose(canvas[off:, off:], 1.0)


def test_receptive_field_table_follows_feature_info(conv):
    rows = V.receptive_field_table(conv)
    assert [r["layer"] for r in rows] == conv.layer_names
    assert [r["receptive_field"] for r in rows] == [f["receptive_field"] for f in conv.feature_info]
    assert rows[0]["receptive_field"] == 3 and rows[0]["covers"] == pytest.approx(9 / 64)
    assert rows[-1]["covers"] == 1.0  # the bottleneck sees all of an 8x8 digit
    assert all(a["receptive_field"] <= b["receptive_field"] for a, b in zip(rows, rows[1:]))


# ---------------------------------------------------------------------------------------------
# activation maximization
# ---------------------------------------------------------------------------------------------
def test_activation_maximization_raises_each_channels_activation(conv, digits):
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    relus = [m for m in conv.modules() if isinstance(m, torch.nn.ReLU)]
    images = digits[1].images
    test = to_float_nchw(images)
    picks = {lp.layer: lp.channels for lp in V.top_patches(conv, images, V.hierarchy_layers(conv), channels=6, k=1)}
    for layer, channels in picks.items():
        result = V.maximize_activation(conv, layer, channels)
        assert result.images.shape == (len(channels), 8, 8, 1)
        assert result.images.min() >= 0 and result.images.max() <= 1
        assert np.all(result.final > 1.05 * result.start + 0.01), (layer, result.start, result.final)
        # The synthesized input beats the average real digit for at least half the channels.
        with torch.inference_mode():
            real = conv.forward_intermediates(test, [layer])[layer].mean((0, 2, 3)).numpy()
        assert np.mean(result.final > real[channels]) >= 0.5
        # and the reported number is what the model gives on that image
        again = _channel_activation(conv, torch.from_numpy(result.images).permute(0, 3, 1, 2), layer, channels)
        np.testing.assert_allclose(again.detach().numpy(), result.final, rtol=1e-4, atol=1e-5)
    # A channel that is silent on the gray start but active on real data still rises (leaky gradient).
    layer = "stage1"
    with torch.inference_mode():
        active = conv.forward_intermediates(test, [layer])[layer].amax((0, 2, 3)).numpy() > 0.1
    start = V.maximize_activation(conv, layer, list(range(8)), steps=1).start
    silent = [c for c in range(8) if start[c] == 0 and active[c]]
    if silent:
        result = V.maximize_activation(conv, layer, silent, steps=60)
        assert np.all(result.final > 0.01), result.final
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    assert all(p.requires_grad for p in conv.parameters())
    assert all(m.inplace for m in relus) and not any(m._forward_hooks for m in relus)


def test_maximize_rejects_a_channel_that_does_not_exist(conv):
    with pytest.raises(ConfigError, match="stage1 has 8 channels"):
        V.maximize_activation(conv, "stage1", [8])


# ---------------------------------------------------------------------------------------------
# every view
# ---------------------------------------------------------------------------------------------
PROBE = {
    "rows": [
        {
            "features": f,
            "classifier": "logreg",
            "dim": d,
            "labels_per_class": k,
            "accuracy": a,
            "macro_f1": a,
            "fit_seconds": 0.1,
        }
        for k, shift in (("10", 0.1), ("all", 0.0))
        for f, d, a in (
            ("stage1/grid4", 128, 0.95),
            ("bottleneck/grid4", 256, 0.93),
            ("random/stage1/grid4", 128, 0.9),
            ("random/bottleneck/grid4", 256, 0.88),
            ("pixels", 64, 0.9),
            ("pca", 32, 0.89),
        )
        for a in [a - shift]
    ]
}


@pytest.mark.parametrize("view", V.VIEWS)
def test_every_view_renders_a_readable_png(view, conv, digits, tmp_path):
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(PROBE))
    history = [
        dict(
            epoch=e,
            step=10 * e,
            images=100,
            train_loss=1 / e,
            val_mse=1.1 / e,
            val_psnr=10 + e,
            val_ssim=0.5 + e / 10,
            lr=1e-3,
            seconds=0.5,
            images_per_s=200.0,
        )
        for e in (1, 2, 3)
    ]
    fig = V.render_view(
        view,
        conv,
        data=digits[1],
        history=history,
        probe_rows=V.load_probe_results(path),
        max_images=200,
        steps=20,
    )
    png_ok(V.save_figure(fig, tmp_path / f"{view}.png"))


def test_feature_maps_show_every_depth(conv, digits, tmp_path):
    maps = V.feature_maps(conv, digits[1].images[:2], conv.layer_names)
    assert {k: v.shape[1:] for k, v in maps.items()} == {f["module"]: tuple(f["shape"]) for f in conv.feature_info}
    arr = png_ok(V.save_figure(V.feature_maps_figure(conv, digits[1].images[:2]), tmp_path / "maps.png"))
    assert arr.shape[0] > 400  # a row per layer


def test_rgb_filters_are_in_colour_and_views_work_without_labels(rgb, tmp_path):
    model, data = rgb
    assert data.labels is None
    weights, kind = V.first_layer_weights(model)
    assert weights.shape[1:] == (3, 3, 3) and "stage1.conv1" in kind
    tile = _filter_tile(weights[0])
    assert tile.shape == (3, 3, 3) and np.abs(tile - tile.mean(-1, keepdims=True)).max() > 0.01  # not gray
    arr = png_ok(V.save_figure(V.filters_figure(model), tmp_path / "filters.png"))
    assert np.abs(arr - arr.mean(-1, keepdims=True)).max() > 30  # colour pixels in the PNG
    for view in ("patches", "embedding", "maps", "receptive", "recon"):
        png_ok(
            V.save_figure(
                V.render_view(view, model, data=data, max_images=100, channels=4, top_k=4), tmp_path / f"{view}.png"
            )
        )
    feats = V.layer_features(model, data.images, "bottleneck")
    xy, rows = V.embed(feats, "tsne", max_points=50)
    assert xy.shape == (50, 2) and len(np.unique(rows)) == 50


def test_dense_views_say_why_they_do_not_apply(dense, digits, tmp_path):
    with pytest.raises(V.ViewNotApplicable, match="vectors, not maps"):
        V.render_view("maps", dense, data=digits[1])
    with pytest.raises(V.ViewNotApplicable, match="whole image"):
        V.render_view("receptive", dense, data=digits[1])
    assert issubclass(V.ViewNotApplicable, ConvaeError)  # the CLI's exit code 2 and one line
    weights, kind = V.first_layer_weights(dense)
    assert weights.shape == (32, 8, 8, 1) and "templates" in kind
    results = V.top_patches(dense, digits[1].images, channels=2, k=3)
    assert [r.layer for r in results] == dense.layer_names
    assert all(p.box == (0, 0, 8, 8) for r in results for row in r.patches for p in row)  # whole images
    for view in ("filters", "patches", "maximize", "embedding", "recon"):
        png_ok(
            V.save_figure(V.render_view(view, dense, data=digits[1], steps=20, channels=4), tmp_path / f"{view}.png")
        )


def test_views_of_64x64_images(tmp_path, one_thread):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    images = np.stack([((np.sin(xx / rng.uniform(2, 8) + yy / rng.uniform(2, 8)) + 1) * 127) for _ in range(64)])
    model = fit(
        images.astype(np.uint8)[..., None], tmp_path / "run", channels=(4, 8, 8), epochs=1, batch_size=32
    ).model_
    data = ImageData(images.astype(np.uint8)[..., None], None, None, "waves")
    for view in ("patches", "maximize", "receptive", "maps"):
        png_ok(
            V.save_figure(V.render_view(view, model, data=data, steps=5, channels=3, top_k=3), tmp_path / f"{view}.png")
        )


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def test_probe_results_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        V.load_probe_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        V.load_probe_results(bad)
    bad.write_text(json.dumps({"rows": [{"features": "pixels"}]}))
    with pytest.raises(ConfigError, match="row 0"):
        V.load_probe_results(bad)


def test_sampling_is_bounded_and_repeatable():
    a = V.sample_indices(10_000, 3000, seed=0)
    assert len(a) == 3000 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, V.sample_indices(10_000, 3000, seed=0))
    np.testing.assert_array_equal(V.sample_indices(50, 3000), np.arange(50))


def test_wrong_image_shape_and_unknown_layers_are_user_errors(conv, rgb):
    with pytest.raises(ConfigError, match="model takes 8x8x1"):
        V.top_patches(conv, rgb[1].images)
    with pytest.raises(ConfigError, match="--layers nope"):
        V.top_patches(conv, np.zeros((2, 8, 8, 1), np.uint8), "nope")
    with pytest.raises(V.ViewNotApplicable, match="history"):
        V.curves_figure([])


def test_views_take_a_blocks_sign_split_maps_as_layers(conv, digits):
    """The split maps a probe reads (stage1.conv1.split) can be looked at too."""
    assert V.view_layers(conv, "stage2.conv1.split,stage1,stage1.conv1.split,stage1.conv1", None) == [
        "stage1.conv1",
        "stage1.conv1.split",
        "stage1",
        "stage2.conv1.split",
    ]
    (split,) = V.top_patches(conv, digits[1].images[:100], "stage1.conv1.split", channels=16, k=2)
    assert len(split.variance) == 16 and split.receptive_field == 3  # 8 channels, split in two; one 3x3 conv
    for row in split.patches:
        for patch in row:
            assert patch.box == conv.receptive_box("stage1.conv1", patch.y, patch.x)
    maps = V.feature_maps(conv, digits[1].images[:2], ["stage1.conv1.split"])["stage1.conv1.split"]
    assert maps.shape == (2, 16, 8, 8) and maps.min() >= 0


def test_reconstruction_figure_still_draws_two_rows(conv, digits, tmp_path):
    images = digits[1].images[:4]
    recon = np.clip(images / 255 + 0.05, 0, 1).astype(np.float32)
    fig = V.reconstruction_figure(images, recon, "t")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 8
    V.save_figure(fig, tmp_path / "r.png")
    fig = V.reconstruction_figure(images, recon, "t", show_error=True)
    assert len(fig.axes) == 12
    png_ok(V.save_figure(fig, tmp_path / "e.png"))


def test_hierarchy_layers_match_the_probes_default(conv, dense):

    for model in (conv, dense):
        assert V.hierarchy_layers(model) == model.hierarchy_layers()


def test_accuracy_by_depth_takes_each_depths_best_trained_and_random_set(conv, tmp_path):
    """A set counts at its deepest layer; each depth's best trained and best random set, and the margin."""
    assert [V.layer_depth(conv, n) for n in conv.feature_layer_names()] == [1, 1, 1, 2, 2, 2, 2]
    rows = [
        dict(features=f, classifier="logreg", labels_per_class="all", accuracy=a)
        for f, a in [
            ("stage1/grid4", 0.90), ("stage1.conv1.split/grid4", 0.93), ("stage1+bottleneck/grid4", 0.95),
            ("random/stage1/grid4", 0.88), ("random/stage1+bottleneck/grid4", 0.90), ("pixels", 0.80),
        ]
    ]  # fmt: skip
    table = V.depth_rows(rows, conv)
    assert [(e["depth"], e["trained_features"], e["random_features"]) for e in table] == [
        (1, "stage1.conv1.split/grid4", "random/stage1/grid4"),
        (2, "stage1+bottleneck/grid4", "random/stage1+bottleneck/grid4"),
    ]
    assert [round(e["margin"], 4) for e in table] == [0.05, 0.05]
    png_ok(V.save_figure(V.depth_figure(rows, conv), tmp_path / "depth.png"))
