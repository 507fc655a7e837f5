"""Tests for jaxfi.models: the zoo, the registry, inference binding, torchvision conversion."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxfi import models
from jaxfi.models import convert, layers

SMALL = ("mlp", "cnn", "lenet5", "resnet8", "resnet20")
# Parameter counts of torchvision's models (1000 classes).
TORCHVISION_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
}


def _abstract_init(model, shape):
    return jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)
    )


def test_registry_lists_every_model():
    assert set(models.MODELS) == set(SMALL) | set(TORCHVISION_PARAMS)


def test_cnn_is_the_108k_benchmark_model():
    """Two unpadded 3x3 convolutions (16, 32) with 2x2 pooling, dense 128, dense 10."""
    params = _abstract_init(models.get_model("cnn"), (28, 28, 1))["params"]
    sizes = {path: int(np.prod(x.shape)) for path, x in
             ((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0])}
    assert sum(sizes.values()) == 108_618
    assert params["fc1"]["kernel"].shape == (800, 128)
    assert 0.94 < sizes["['fc1']['kernel']"] / 108_618 < 0.95


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet9'.*lenet5.*mobilenet_v2"):
        models.get_model("resnet9")


@pytest.fixture(scope="module")
def small_variables():
    """name -> variables of the small models at 28x28x1, initialised once per module."""
    return {
        name: models.init_variables(models.get_model(name), (28, 28, 1))
        for name in ("mlp", "lenet5", "resnet8")
    }


def _np_conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    """A float64 NHWC x HWIO convolution with symmetric zero padding, from its definition."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("nhwcij,ijco->nhwo", windows, kernel)


def _np_pool(x: np.ndarray) -> np.ndarray:
    """2x2 max pooling with stride 2 (even sizes)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _np_bn(x: np.ndarray, params: dict, stats: dict) -> np.ndarray:
    """BatchNorm in inference mode, epsilon 1e-5."""
    return (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _np_dense(x: np.ndarray, params: dict) -> np.ndarray:
    return x @ params["kernel"] + params["bias"]


def _np_mlp(v: dict, x: np.ndarray) -> np.ndarray:
    p = v["params"]
    h = _relu(_np_dense(_relu(_np_dense(x.reshape(len(x), -1), p["fc1"])), p["fc2"]))
    return _np_dense(h, p["fc3"])


def _np_lenet5(v: dict, x: np.ndarray) -> np.ndarray:
    p = v["params"]
    h = _np_pool(_relu(_np_conv(x, p["conv1"]["kernel"], pad=2) + p["conv1"]["bias"]))
    h = _np_pool(_relu(_np_conv(h, p["conv2"]["kernel"]) + p["conv2"]["bias"]))
    h = _relu(_np_dense(h.reshape(len(h), -1), p["fc1"]))
    return _np_dense(_relu(_np_dense(h, p["fc2"])), p["fc3"])


def _np_resnet8(v: dict, x: np.ndarray) -> np.ndarray:
    p, s = v["params"], v["batch_stats"]
    h = _relu(_np_bn(_np_conv(x, p["conv1"]["kernel"], pad=1), p["bn1"], s["bn1"]))
    for name, stride in (("layer1_0", 1), ("layer2_0", 2), ("layer3_0", 2)):
        bp, bs = p[name], s[name]
        y = _relu(_np_bn(_np_conv(h, bp["conv1"]["kernel"], stride, 1), bp["bn1"], bs["bn1"]))
        y = _np_bn(_np_conv(y, bp["conv2"]["kernel"], pad=1), bp["bn2"], bs["bn2"])
        if "downsample_conv" in bp:
            h = _np_bn(_np_conv(h, bp["downsample_conv"]["kernel"], stride), bp["downsample_bn"], bs["downsample_bn"])
        h = _relu(y + h)
    return _np_dense(h.mean(axis=(1, 2)), p["fc"])


NUMPY_MODELS = {"mlp": _np_mlp, "lenet5": _np_lenet5, "resnet8": _np_resnet8}


def _randomized(variables: dict, seed: int = 0) -> dict:
    """``variables`` with BatchNorm scales, biases and running statistics drawn away from their
    identity init (so that the reference checks them), as float32."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        if "'var'" in key or "'scale'" in key:
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if "'mean'" in key or "bn" in key:
            return rng.normal(0.0, 0.5, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet8"])
def test_small_model_forward_on_mnist_shape(small_variables, name):
    """Ten logits per 28x28x1 image, equal (to float32 rounding) to the architecture written
    out in float64 numpy: layers, padding, strides, pooling, BatchNorm statistics, shortcuts."""
    variables = _randomized(small_variables[name])
    apply_fn, params = models.bind_inference(models.get_model(name), variables)
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 28, 28, 1)))
    logits = np.asarray(jax.jit(apply_fn)(params, x))
    assert logits.shape == (3, 10)
    expected = NUMPY_MODELS[name](jax.tree.map(lambda a: np.asarray(a, np.float64), variables), x.astype(np.float64))
    scale = np.abs(expected).max()
    assert scale > 0.1
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * scale)


def test_bind_inference_is_apply_in_inference_mode(small_variables):
    model, variables = models.get_model("mlp"), small_variables["mlp"]
    apply_fn, params = models.bind_inference(model, variables)
    assert params is variables
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    np.testing.assert_array_equal(apply_fn(params, x), model.apply(variables, x, train=False))


def test_resnet20_shapes():
    variables = _abstract_init(models.get_model("resnet20"), (28, 28, 1))
    assert list(variables["params"])[:6] == ["bn1", "conv1", "fc", "layer1_0", "layer1_1", "layer1_2"]
    assert "layer3_2" in variables["batch_stats"]


def test_small_models_have_readable_layer_names_and_sizes():
    lenet = _abstract_init(models.get_model("lenet5"), (28, 28, 1))
    assert list(lenet["params"]) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert 50_000 <= models.param_count(lenet["params"]) <= 110_000
    resnet = _abstract_init(models.get_model("resnet8"), (28, 28, 1))
    assert set(resnet["params"]["layer2_0"]) == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "downsample_conv",
        "downsample_bn",
    }
    assert set(resnet["batch_stats"]["layer1_0"]["bn1"]) == {"mean", "var"}


def test_batchnorm_model_in_inference_mode_is_per_example(small_variables):
    apply_fn, params = models.bind_inference(models.get_model("resnet8"), small_variables["resnet8"])
    predict = jax.jit(apply_fn)
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    np.testing.assert_allclose(predict(params, x)[:1], predict(params, x[:1]), rtol=1e-5, atol=1e-5)


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.init_variables(models.get_model("resnet8", depth=9), (8, 8, 1))


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_imagenet_models_have_torchvision_shapes(name):
    model = models.get_model(name)
    variables = _abstract_init(model, (224, 224, 3))
    assert models.param_count(variables["params"]) == TORCHVISION_PARAMS[name]
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((2, 224, 224, 3)))
    assert out.shape == (2, 1000)


def test_too_small_input_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        _abstract_init(models.get_model("alexnet"), (48, 48, 3))


def test_adaptive_avg_pool_matches_torch_rule():
    x = jnp.arange(5.0).reshape(1, 5, 1, 1)
    # torch: bins [0,2), [1,3), [2,4) ... for 5 -> 3: floor(i*5/3) .. ceil((i+1)*5/3)
    out = layers.adaptive_avg_pool(jnp.broadcast_to(x, (1, 5, 3, 1)), 3, 3)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.5, 2.0, 3.5])


# --- torchvision state dicts, described independently of the converter's naming -------------


def _conv(sd, name, out_c, in_c, k, bias=False):
    sd[f"{name}.weight"] = (out_c, in_c, k, k)
    if bias:
        sd[f"{name}.bias"] = (out_c,)


def _bn(sd, name, c):
    for field in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{name}.{field}"] = (c,)
    sd[f"{name}.num_batches_tracked"] = ()


def _linear(sd, name, out_f, in_f):
    sd[f"{name}.weight"] = (out_f, in_f)
    sd[f"{name}.bias"] = (out_f,)


def tv_resnet18_shapes(num_classes=1000):
    sd = {}
    _conv(sd, "conv1", 64, 3, 7)
    _bn(sd, "bn1", 64)
    in_c = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            p = f"layer{i}.{j}"
            _conv(sd, f"{p}.conv1", width, in_c, 3)
            _bn(sd, f"{p}.bn1", width)
            _conv(sd, f"{p}.conv2", width, width, 3)
            _bn(sd, f"{p}.bn2", width)
            if in_c != width:
                _conv(sd, f"{p}.downsample.0", width, in_c, 1)
                _bn(sd, f"{p}.downsample.1", width)
            in_c = width
    _linear(sd, "fc", num_classes, 512)
    return sd


def tv_alexnet_shapes(num_classes=1000, hidden=4096):
    sd = {}
    convs = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    for idx, (o, i, k) in convs.items():
        _conv(sd, f"features.{idx}", o, i, k, bias=True)
    _linear(sd, "classifier.1", hidden, 256 * 6 * 6)
    _linear(sd, "classifier.4", hidden, hidden)
    _linear(sd, "classifier.6", num_classes, hidden)
    return sd


def tv_vgg16_shapes(num_classes=1000, hidden=4096):
    sd, idx, in_c = {}, 0, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            idx += 1
            continue
        _conv(sd, f"features.{idx}", v, in_c, 3, bias=True)
        idx, in_c = idx + 2, v
    _linear(sd, "classifier.0", hidden, 512 * 7 * 7)
    _linear(sd, "classifier.3", hidden, hidden)
    _linear(sd, "classifier.6", num_classes, hidden)
    return sd


def tv_mobilenet_v2_shapes(num_classes=1000):
    sd = {}
    _conv(sd, "features.0.0", 32, 3, 3)
    _bn(sd, "features.0.1", 32)
    in_c, idx = 32, 1
    for t, c, n, _ in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for _ in range(n):
            hidden, p, j = in_c * t, f"features.{idx}.conv", 0
            if t != 1:
                _conv(sd, f"{p}.0.0", hidden, in_c, 1)
                _bn(sd, f"{p}.0.1", hidden)
                j = 1
            _conv(sd, f"{p}.{j}.0", hidden, 1, 3)
            _bn(sd, f"{p}.{j}.1", hidden)
            _conv(sd, f"{p}.{j + 1}", c, hidden, 1)
            _bn(sd, f"{p}.{j + 2}", c)
            in_c, idx = c, idx + 1
    _conv(sd, "features.18.0", 1280, 320, 1)
    _bn(sd, "features.18.1", 1280)
    _linear(sd, "classifier.1", num_classes, 1280)
    return sd


def _trainable_count(shapes):
    return sum(
        int(np.prod(s))
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


@pytest.mark.parametrize(
    "name,shapes",
    [
        ("resnet18", tv_resnet18_shapes),
        ("alexnet", tv_alexnet_shapes),
        ("vgg16", tv_vgg16_shapes),
        ("mobilenet_v2", tv_mobilenet_v2_shapes),
    ],
)
def test_torchvision_descriptions_have_torchvision_sizes(name, shapes):
    assert _trainable_count(shapes()) == TORCHVISION_PARAMS[name]


def _random_state_dict(shapes, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(7, np.int64)
        elif key.endswith("running_var"):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return sd


CASES = {
    "resnet18": (lambda: models.ResNet18(num_classes=10), lambda: tv_resnet18_shapes(10)),
    "alexnet": (lambda: models.AlexNet(num_classes=10, hidden=32), lambda: tv_alexnet_shapes(10, 32)),
    "vgg16": (lambda: models.VGG16(num_classes=10, hidden=32), lambda: tv_vgg16_shapes(10, 32)),
    "mobilenet_v2": (lambda: models.MobileNetV2(num_classes=10), lambda: tv_mobilenet_v2_shapes(10)),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (model, torch state dict, converted variables), each loaded from .npz and .safetensors."""
    out = {}
    directory = tmp_path_factory.mktemp("torchvision")
    for name, (make_model, make_shapes) in CASES.items():
        model, sd = make_model(), _random_state_dict(make_shapes())
        np.savez(directory / f"{name}.npz", **sd)
        safetensors.numpy.save_file(sd, str(directory / f"{name}.safetensors"))
        from_npz = convert.from_torchvision(model, directory / f"{name}.npz")
        from_st = convert.from_torchvision(model, str(directory / f"{name}.safetensors"))
        jax.tree.map(np.testing.assert_array_equal, from_npz, from_st)
        out[name] = (model, sd, from_npz)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_variables_have_every_model_shape(converted, name):
    model, _, variables = converted[name]
    expected = _abstract_init(model, (224, 224, 3))
    assert jax.tree.structure(variables) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("name", sorted(CASES))
def test_imagenet_models_run_on_small_inputs(converted, name):
    # AlexNet and VGG pool adaptively to 6x6 / 7x7, like torchvision, so small inputs work.
    model, _, variables = converted[name]
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    logits = jax.jit(models.bind_inference(model, variables)[0])(variables, x)
    assert logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))


def _torch_conv2d(x_nchw, w_oihw, stride, padding):
    """Reference cross-correlation with PyTorch's semantics, in numpy."""
    x = np.pad(x_nchw, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    _, _, kh, kw = w_oihw.shape
    oh = (x.shape[2] - kh) // stride + 1
    ow = (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w_oihw.shape[0], oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += np.einsum("nchw,oc->nohw", patch, w_oihw[:, :, i, j])
    return out


def _layer_io(model, variables, x, layer):
    """Input and output of the submodule at path ``layer`` (e.g. "conv1") in an inference forward pass."""

    def forward(variables, x):
        seen = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if "/".join(context.module.scope.path) == layer and context.method_name == "__call__":
                seen.update(inputs=args[0], outputs=out)
            return out

        with nn.intercept_methods(record):
            model.apply(variables, x, train=False)
        return seen["inputs"], seen["outputs"]

    return tuple(np.asarray(a) for a in jax.jit(forward)(variables, x))


def test_converted_conv_matches_torch_semantics(converted):
    model, sd, variables = converted["resnet18"]
    x = np.random.default_rng(1).standard_normal((2, 20, 20, 3)).astype(np.float32)
    _, got = _layer_io(model, variables, x, "conv1")
    want = _torch_conv2d(x.transpose(0, 3, 1, 2), sd["conv1.weight"], stride=2, padding=3).transpose(
        0, 2, 3, 1
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_converted_first_dense_matches_torch_flatten_order(converted):
    model, sd, variables = converted["alexnet"]
    # At 224x224 the last feature map is genuinely 6x6 (no adaptive-pool replication).
    x = np.random.default_rng(2).standard_normal((1, 224, 224, 3)).astype(np.float32)
    flat_hwc, got = _layer_io(model, variables, x, "fc1")
    feature_nchw = flat_hwc.reshape(1, 6, 6, 256).transpose(0, 3, 1, 2)
    want = feature_nchw.reshape(1, -1) @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_converted_batchnorm_fields(converted):
    _, sd, variables = converted["mobilenet_v2"]
    np.testing.assert_array_equal(
        variables["params"]["block2"]["dw_bn"]["scale"], sd["features.2.conv.1.1.weight"]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1"]["project_bn"]["var"], sd["features.1.conv.2.running_var"]
    )
    np.testing.assert_array_equal(
        variables["params"]["block1"]["dw_conv"]["kernel"],
        sd["features.1.conv.0.0.weight"].transpose(2, 3, 1, 0),
    )


def test_converter_names_missing_and_unexpected_keys():
    sd = _random_state_dict(tv_alexnet_shapes(10, 32))
    sd["features.99.weight"] = sd.pop("features.3.weight")
    with pytest.raises(
        ValueError,
        match=r"missing keys \['features\.3\.weight'\].*unexpected keys \['features\.99\.weight'\]",
    ):
        convert.from_torchvision(models.AlexNet(num_classes=10, hidden=32), sd)


def test_converter_names_a_key_with_the_wrong_shape():
    sd = _random_state_dict(tv_alexnet_shapes(10, 32))
    with pytest.raises(ValueError, match=r"'classifier\.6\.weight' has shape \(10, 32\), expected \(7, 32\)"):
        convert.from_torchvision(models.AlexNet(num_classes=7, hidden=32), sd)


def test_converter_rejects_unsupported_models_and_files(tmp_path):
    with pytest.raises(ValueError, match="no torchvision conversion for LeNet5"):
        convert.from_torchvision(models.LeNet5(), {})
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        convert.load_state_dict(tmp_path / "weights.pt")
