"""Layer helpers shared by the model zoo, matching PyTorch's conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfi._src.extras import require

nn = require("flax.linen", "models")


def conv(
    features: int,
    kernel: int,
    name: str,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = False,
) -> nn.Conv:
    """A square convolution with PyTorch's symmetric zero padding.

    Explicit padding matters: Flax's "SAME" pads strided convolutions
    asymmetrically and would not match torchvision's weights.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=bias,
        name=name,
    )


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch's MaxPool2d (padding counts as -inf)."""
    return nn.max_pool(x, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)))


def relu6(x: jax.Array) -> jax.Array:
    """min(max(x, 0), 6), as in MobileNetV2."""
    return jnp.minimum(nn.relu(x), 6.0)


def flatten(x: jax.Array) -> jax.Array:
    """Flattens all but the batch axis, in NHWC order."""
    return x.reshape(x.shape[0], -1)


def adaptive_avg_pool(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d on NHWC: cell i spans floor(i*H/out) to ceil((i+1)*H/out)."""
    h, w = x.shape[1:3]
    if h == 0 or w == 0:
        raise ValueError(
            f"feature map is empty ({h}x{w}) before adaptive pooling: the input image is too small"
        )
    if (h, w) == (out_h, out_w):
        return x
    rows = [(i * h // out_h, -(-(i + 1) * h // out_h)) for i in range(out_h)]
    cols = [(j * w // out_w, -(-(j + 1) * w // out_w)) for j in range(out_w)]
    return jnp.stack(
        [jnp.stack([x[:, r0:r1, c0:c1].mean(axis=(1, 2)) for c0, c1 in cols], axis=1) for r0, r1 in rows],
        axis=1,
    )
