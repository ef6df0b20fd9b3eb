"""The model: shapes over sizes, channels, depths and kinds; feature_info; config round trips."""

import itertools
import json

import pytest
import torch

from convae.config import RunConfig, TrainConfig, from_dict, to_dict
from convae.errors import ConfigError
from convae.models import ModelConfig, build_model, code_size, default_model_config, max_stages, stage_sizes
from convae.models.blocks import winner_take_all

SIZES = [(8, 8), (28, 28), (32, 32), (37, 53), (5, 9)]
CHANNELS = [1, 3, 4, 6]


def _config(size, c, depth, **kw):
    return ModelConfig(in_channels=c, image_size=size, channels=tuple(8 * 2**i for i in range(depth)), **kw)


@pytest.mark.parametrize("size,c", list(itertools.product(SIZES, CHANNELS)))
def test_reconstruction_has_the_input_shape(size, c):
    depth = min(3, max_stages(size))
    model = build_model(_config(size, c, depth, convs_per_stage=1)).eval()
    x = torch.rand(2, c, *size)
    y = model(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(
    "downsample,upsample,decoder,bottleneck,norm",
    list(
        itertools.product(
            ["max", "avg", "stride"],
            ["nearest", "bilinear", "transpose"],
            ["mirror", "light"],
            ["conv", "dense"],
            ["batch", "group", "none"],
        )
    ),
)
def test_every_kind_keeps_odd_non_square_shapes(downsample, upsample, decoder, bottleneck, norm):
    cfg = _config(
        (37, 53),
        3,
        3,
        downsample=downsample,
        upsample=upsample,
        decoder=decoder,
        bottleneck=bottleneck,
        norm=norm,
        latent_dim=16,
    )
    model = build_model(cfg).eval()
    x = torch.rand(2, 3, 37, 53)
    code = model.encode(x)
    assert code.flatten(1).shape[1] == code_size(cfg)
    assert model(x).shape == x.shape
    assert model.decode(code).shape == x.shape


def _decoder_conv_flops(model, x) -> int:
    flops = 0

    def count(module, args, out):
        nonlocal flops
        if isinstance(module, torch.nn.Conv2d):
            flops += out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.decoder.modules()]
    model.decode(model.encode(x))
    for h in hooks:
        h.remove()
    return flops


def test_light_decoder_convolves_before_upsampling_with_the_same_weights():
    mirror = build_model(_config((28, 28), 1, 3, convs_per_stage=1)).eval()
    light = build_model(_config((28, 28), 1, 3, convs_per_stage=1, decoder="light")).eval()
    light.load_state_dict(mirror.state_dict())  # same tensors, only the order of operations differs
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(light.encode(x), mirror.encode(x))
    assert light(x).shape == x.shape and not torch.allclose(light(x), mirror(x))
    assert _decoder_conv_flops(light, x) * 3 < _decoder_conv_flops(mirror, x)


def test_configs_written_before_the_decoder_option_load_as_the_mirrored_decoder():
    data = to_dict(RunConfig(model=ModelConfig(decoder="light")))
    assert from_dict(RunConfig, data).model.decoder == "light"
    del data["model"]["decoder"]
    assert from_dict(RunConfig, data).model.decoder == "mirror"


def test_latent_channels_makes_a_1x1_code():
    cfg = _config((28, 28), 1, 3, latent_channels=5)
    model = build_model(cfg)
    assert model.encode(torch.rand(1, 1, 28, 28)).shape == (1, 5, 4, 4)
    assert code_size(cfg) == 5 * 4 * 4


def test_stage_sizes_round_up_so_no_pixel_is_lost():
    assert stage_sizes((37, 53), 3) == [(37, 53), (19, 27), (10, 14), (5, 7)]


def test_too_small_for_depth_is_a_clear_error():
    with pytest.raises(ConfigError, match="too small for 4 stages"):
        ModelConfig(image_size=(8, 8), channels=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match="odd"):
        ModelConfig(kernel_size=4)


def test_feature_info_names_channels_stride_and_receptive_field():
    model = build_model(_config((28, 28), 1, 3, convs_per_stage=2))
    names = model.layer_names
    assert names == [
        "stage1.conv1",
        "stage1.conv2",
        "stage1",
        "stage2.conv1",
        "stage2.conv2",
        "stage2",
        "stage3.conv1",
        "stage3.conv2",
        "stage3",
        "bottleneck",
    ]
    info = {f["module"]: f for f in model.feature_info}
    # 3x3 convs add 2*stride each; 2x2 pools add stride and double it.
    assert [info[n]["receptive_field"] for n in names] == [3, 5, 6, 10, 14, 16, 24, 32, 36, 36]
    assert [info[n]["reduction"] for n in names] == [1, 1, 2, 2, 2, 4, 4, 4, 8, 8]
    assert info["stage2"]["shape"] == [16, 7, 7]
    x = torch.rand(2, 1, 28, 28)
    feats = model.forward_intermediates(x, names)
    for name in names:
        assert list(feats[name].shape[1:]) == info[name]["shape"]
        assert info[name]["num_chs"] == feats[name].shape[1]


def test_receptive_field_is_exact_by_gradient():
    """The input pixels that affect a unit are exactly its receptive_box."""
    # Leaky ReLUs and average pooling pass a gradient to every pixel in the field: with ReLU and
    # max pooling, whether the corners are reached depends on the random weights.
    torch.manual_seed(0)
    config = _config((28, 28), 1, 2, convs_per_stage=2, norm="none", activation="leaky_relu", downsample="avg")
    model = build_model(config).eval()
    for layer, (y, x) in [("stage1.conv2", (5, 7)), ("stage2", (3, 2)), ("stage2.conv1", (0, 0))]:
        inp = torch.rand(1, 1, 28, 28, requires_grad=True)
        out = model.forward_intermediates(inp, [layer])[layer]
        out[0, :, y, x].sum().backward()
        rows, cols = torch.nonzero(inp.grad[0, 0].abs() > 0, as_tuple=True)
        top, left, bottom, right = model.receptive_box(layer, y, x)
        assert rows.min() >= top and rows.max() < bottom and cols.min() >= left and cols.max() < right
        # the box is tight: its corners (within the image) are reached
        assert rows.min() == top and cols.min() == left and rows.max() == bottom - 1 and cols.max() == right - 1


def test_forward_intermediates_stops_after_the_deepest_layer_asked_for():
    model = build_model(_config((28, 28), 1, 3))
    called = []
    for name in ("stage2", "stage3"):
        model.encoder[name].pool.register_forward_hook(lambda m, i, o, name=name: called.append(name))
    model.forward_intermediates(torch.rand(1, 1, 28, 28), ["stage1", "stage2.conv1"])
    assert called == []
    with pytest.raises(ConfigError, match="unknown layer"):
        model.forward_intermediates(torch.rand(1, 1, 28, 28), ["stage9"])


def test_dense_baseline_has_a_comparable_code():
    cfg = default_model_config((28, 28, 1), arch="dense")
    model = build_model(cfg)
    assert cfg.latent_dim <= 28 * 28 // 2
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == x.shape
    assert model.encode(x).shape == (3, cfg.latent_dim)
    assert model.layer_names == ["fc1", "bottleneck"]
    assert model.describe()[-1]["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "shape,channels",
    [
        ((8, 8, 1), (32, 64)),
        ((28, 28, 1), (32, 64, 128)),
        ((32, 32, 3), (64, 128, 256)),
        ((48, 48, 3), (64, 128, 256, 256)),
        # photo sizes: stages until about 8x8, colour from 32 channels (chosen on a 96 px folder)
        ((64, 64, 3), (32, 64, 128)),
        ((96, 96, 3), (32, 64, 128, 256)),
        ((128, 96, 3), (32, 64, 128, 256)),
        ((256, 256, 3), (32, 64, 128, 256, 256)),
    ],
)
def test_defaults_adapt_to_the_image_size(shape, channels):
    cfg = default_model_config(shape)
    assert cfg.channels == channels
    assert cfg.in_channels == shape[2]
    assert build_model(cfg)(torch.rand(1, shape[2], *shape[:2])).shape == (1, shape[2], *shape[:2])


def test_run_config_round_trips_through_json():
    cfg = RunConfig(
        model=default_model_config((37, 53, 3), bottleneck="dense", code_wta=0.1, decoder="light"),
        train=TrainConfig(noise=0.2, on_nan="reduce-lr"),
    )
    text = json.dumps(to_dict(cfg))
    assert from_dict(RunConfig, json.loads(text)) == cfg


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"model": {"colour": 1}}, "unknown field"),
        ({"model": {"channels": "32"}}, "expected a list"),
        ({"model": {"kernel_size": 3.5}}, "expected an integer"),
        ({"model": {"norm": "layer"}}, "not one of"),
        ({"train": {"lr": True}}, "expected a number"),
        ({"train": {"batch_size": 0}}, "batch_size"),
        ({"train": {"on_nan": "retry"}}, "on_nan"),
        ({"model": {"code_wta": 1.5}}, "code_wta"),
    ],
)
def test_bad_config_fields_are_named(patch, match):
    data = to_dict(RunConfig(model=ModelConfig()))
    for section, values in patch.items():
        data[section].update(values)
    with pytest.raises(ConfigError, match=match):
        from_dict(RunConfig, data)
    with pytest.raises(ConfigError, match="missing field 'model'"):
        from_dict(RunConfig, {})


def test_winner_take_all_keeps_each_maps_peak_in_the_strongest_images():
    code = torch.rand(10, 4, 3, 3)
    sparse = winner_take_all(code, 0.2)
    # per channel: 2 of the 10 images (20%) keep one value each, their map's peak
    assert ((sparse != 0).sum(dim=(0, 2, 3)) == 2).all()
    peaks = code.amax(dim=(2, 3))
    kept = sparse.amax(dim=(2, 3))
    assert torch.equal(kept[kept != 0], peaks[kept != 0])
    assert torch.equal(kept != 0, peaks >= peaks.topk(2, dim=0).values[-1:])


def test_code_wta_sparsifies_what_the_decoder_sees_but_not_the_features():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16), convs_per_stage=1, code_wta=0.25)).eval()
    dense = build_model(ModelConfig(channels=(8, 16), convs_per_stage=1)).eval()
    dense.load_state_dict(model.state_dict())
    x = torch.rand(8, 1, 28, 28)
    code = model.encode(x)
    assert torch.equal(code, dense.encode(x)) and (code != 0).float().mean() > 0.3
    assert torch.allclose(model.forward_logits(x), dense.decode_logits(winner_take_all(code, 0.25)))
    with pytest.raises(ConfigError, match="code_wta applies to the conv autoencoder"):
        ModelConfig(arch="dense", code_wta=0.2)
