"""torchvision state dicts -> variables of the jaxfi ImageNet models, without torch.

Save a torchvision model's weights once, where torch is installed, as either::

    safetensors.torch.save_file(tv_model.state_dict(), "resnet18.safetensors")
    np.savez("resnet18.npz", **{k: v.numpy() for k, v in tv_model.state_dict().items()})

then ``from_torchvision(ResNet18(), "resnet18.safetensors")``. ``to_torchvision``
goes the other way (e.g. random weights in torchvision's layout for tests,
or a jaxfi model's weights for torch). Conversion:
conv weight OIHW -> kernel HWIO, linear weight (out, in) -> kernel (in, out),
BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var. The
first classifier layer of AlexNet and VGG-16 also has its inputs reordered,
because torch flattens feature maps as CHW and these models flatten HWC.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src.extras import require
from jaxfi.models.imagenet import MOBILENET_V2_BLOCKS, VGG16, VGG16_BLOCKS, AlexNet, MobileNetV2
from jaxfi.models.resnet import ImageNetResNet

nn = require("flax.linen", "models")

__all__ = ["from_torchvision", "load_state_dict", "to_torchvision"]

Path = tuple[str, ...]
_BN_FIELDS = (
    ("params", "scale", "weight"),
    ("params", "bias", "bias"),
    ("batch_stats", "mean", "running_mean"),
    ("batch_stats", "var", "running_var"),
)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch-layout state dict saved as ``.npz`` or ``.safetensors``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        safetensors_numpy = require("safetensors.numpy", "convert")
        return dict(safetensors_numpy.load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    raise ValueError(f"state dict file must end in .npz or .safetensors, got {path!r}")


def from_torchvision(
    model: nn.Module, state_dict: Mapping[str, np.ndarray] | str | os.PathLike
) -> dict[str, Any]:
    """Variables ``{'params', 'batch_stats'?}`` for ``model`` from a torchvision state dict.

    ``model`` is an ``AlexNet``, ``VGG16``, ``ResNet18``, ``ResNet50`` or
    ``MobileNetV2`` whose fields (num_classes, hidden) match the weights.

    Raises:
      ValueError: unsupported model, missing or unexpected keys (all listed),
        or a tensor whose shape does not fit (the key and both shapes named).
    """
    if not isinstance(state_dict, Mapping):
        state_dict = load_state_dict(state_dict)
    torch_name, flatten_chw = _naming(model)
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, 224, 224, 3), jnp.float32),
    )
    out: dict[str, Any] = {}
    used: set[str] = set()
    missing: list[str] = []
    for path, leaves in _modules(abstract["params"]):
        for col, leaf, key, fn in _fields(path, leaves, torch_name(path), flatten_chw):
            if key not in state_dict:
                missing.append(key)
                continue
            target = functools.reduce(lambda tree, name: tree[name], (col, *path, leaf), abstract)
            _set(out, (col, *path, leaf), _convert(key, np.asarray(state_dict[key]), fn, target))
            used.add(key)
    # BatchNorm's step counter has no role at inference.
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(".num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit {type(model).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    return out


def to_torchvision(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torchvision state dict (numpy arrays, torch layout and key names) of ``model``'s ``variables``.

    The inverse of ``from_torchvision``: ``from_torchvision(model,
    to_torchvision(model, variables))`` gives ``variables`` back, and the
    result can be saved with ``np.savez`` or ``safetensors.numpy.save_file``.
    BatchNorm's ``num_batches_tracked`` is left out (it has no role at
    inference).

    Args:
      model: an ``AlexNet``, ``VGG16``, ``ResNet18``, ``ResNet50`` or ``MobileNetV2``.
      variables: its variables ``{'params', 'batch_stats'?}``, e.g. from
        ``jaxfi.models.init_variables(model, (224, 224, 3))``.

    Raises:
      ValueError: unsupported model, or variables that lack one of the model's leaves.
    """
    torch_name, flatten_chw = _naming(model)
    out: dict[str, np.ndarray] = {}
    for path, leaves in _modules(variables["params"]):
        for col, leaf, key, _ in _fields(path, leaves, torch_name(path), flatten_chw):
            try:
                value = np.asarray(functools.reduce(lambda tree, name: tree[name], (col, *path, leaf), variables))
            except KeyError:
                raise ValueError(f"variables lack {'/'.join((col, *path, leaf))} of {type(model).__name__}") from None
            out[key] = _to_torch(path, value, flatten_chw) if leaf == "kernel" else value
    return out


def _to_torch(path: Path, kernel: np.ndarray, flatten_chw: Mapping[Path, int]) -> np.ndarray:
    """A Flax kernel in torch layout: HWIO -> OIHW, (in, out) -> (out, in), HWC-flattened inputs -> CHW."""
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    if path in flatten_chw:
        channels = flatten_chw[path]
        side = int(round((kernel.shape[0] // channels) ** 0.5))
        out = kernel.shape[1]
        return kernel.T.reshape(out, side, side, channels).transpose(0, 3, 1, 2).reshape(out, -1)
    return kernel.T


def _fields(
    path: Path, leaves: Mapping[str, Any], prefix: str, flatten_chw: Mapping[Path, int]
) -> list[tuple[str, str, str, Callable[[np.ndarray], np.ndarray]]]:
    """(collection, Flax leaf, torch key, torch->Flax transform) for one layer."""
    if "scale" in leaves:
        return [(col, leaf, f"{prefix}.{key}", _identity) for col, leaf, key in _BN_FIELDS]
    fields = [("params", "kernel", f"{prefix}.weight", _kernel_fn(path, leaves["kernel"].shape, flatten_chw))]
    if "bias" in leaves:
        fields.append(("params", "bias", f"{prefix}.bias", _identity))
    return fields


def _modules(tree: Mapping[str, Any], path: Path = ()) -> list[tuple[Path, Mapping[str, Any]]]:
    """(path, {leaf name: leaf}) for every module holding parameters directly."""
    found = []
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        found.append((path, leaves))
    for k, v in tree.items():
        if isinstance(v, Mapping):
            found.extend(_modules(v, (*path, k)))
    return found


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _kernel_fn(
    path: Path, shape: tuple[int, ...], flatten_chw: Mapping[Path, int]
) -> Callable[[np.ndarray], np.ndarray]:
    """The torch-weight -> Flax-kernel transform for one conv or dense layer."""
    if len(shape) == 4:
        return lambda w: w.transpose(2, 3, 1, 0)
    if path in flatten_chw:
        channels = flatten_chw[path]
        side = int(round((shape[0] // channels) ** 0.5))
        return lambda w: (
            w.reshape(w.shape[0], channels, side, side).transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
        )
    return lambda w: w.T


def _convert(
    key: str, value: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], target: jax.ShapeDtypeStruct
) -> jax.Array:
    expected = _torch_shape(target.shape)
    if value.shape != expected:
        raise ValueError(f"state dict key {key!r} has shape {value.shape}, expected {expected}")
    return jnp.asarray(fn(value), dtype=target.dtype)


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf: HWIO -> OIHW, (in, out) -> (out, in), vectors unchanged."""
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape))


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _naming(model: nn.Module) -> tuple[Callable[[Path], str], dict[Path, int]]:
    """(Flax module path -> torch module name, {dense path: channels flattened CHW by torch})."""
    if isinstance(model, ImageNetResNet):
        return _resnet_name, {}
    if isinstance(model, AlexNet):
        names = {f"conv{i}": f"features.{j}" for i, j in zip(range(1, 6), (0, 3, 6, 8, 10), strict=True)}
        names.update(fc1="classifier.1", fc2="classifier.4", fc3="classifier.6")
        return lambda path: names[path[0]], {("fc1",): 256}
    if isinstance(model, VGG16):
        return lambda path: _vgg16_names()[path[0]], {("fc1",): VGG16_BLOCKS[-1][-1]}
    if isinstance(model, MobileNetV2):
        return _mobilenet_v2_name, {}
    raise ValueError(
        f"no torchvision conversion for {type(model).__name__}; supported: "
        "AlexNet, VGG16, ResNet18, ResNet50, MobileNetV2"
    )


def _resnet_name(path: Path) -> str:
    """("layer1_0", "downsample_conv") -> "layer1.0.downsample.0"."""
    renames = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
    return ".".join(renames.get(p, p.replace("_", ".")) for p in path)


@functools.cache
def _vgg16_names() -> dict[str, str]:
    """conv{b}_{c} -> features.{i}: each conv takes two indices (conv, ReLU), each pool one."""
    names, index = {}, 0
    for b, block in enumerate(VGG16_BLOCKS, start=1):
        for c in range(1, len(block) + 1):
            names[f"conv{b}_{c}"] = f"features.{index}"
            index += 2
        index += 1
    names.update(fc1="classifier.0", fc2="classifier.3", fc3="classifier.6")
    return names


def _mobilenet_v2_name(path: Path) -> str:
    """("block2", "dw_conv") -> "features.2.conv.1.0"; stem/head/classifier likewise."""
    fixed = {
        "stem_conv": "features.0.0",
        "stem_bn": "features.0.1",
        "head_conv": "features.18.0",
        "head_bn": "features.18.1",
        "classifier": "classifier.1",
    }
    if path[0] in fixed:
        return fixed[path[0]]
    block = int(path[0].removeprefix("block"))
    # torchvision omits the expansion layer when t == 1, shifting the later indices by one.
    shift = 0 if MOBILENET_V2_BLOCKS[block - 1][0] != 1 else 1
    layer = {
        "expand_conv": "0.0",
        "expand_bn": "0.1",
        "dw_conv": f"{1 - shift}.0",
        "dw_bn": f"{1 - shift}.1",
        "project_conv": f"{2 - shift}",
        "project_bn": f"{3 - shift}",
    }[path[1]]
    return f"features.{block}.conv.{layer}"
