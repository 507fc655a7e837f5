"""torchvision's AlexNet, VGG-16 and MobileNetV2 in Flax Linen (NHWC).

Layer shapes, padding and pooling follow torchvision exactly, so its trained
weights convert one to one (see ``jaxfi.models.convert``). Layers get readable
names (conv1, fc1, block3/dw_conv, ...) rather than torchvision's indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfi._src.extras import require
from jaxfi.models.layers import adaptive_avg_pool, batch_norm, conv, flatten, max_pool, relu6

nn = require("flax.linen", "models")


class AlexNet(nn.Module):
    """torchvision's alexnet: conv1..conv5, fc1..fc3 (61.1M parameters).

    ``hidden`` sets the width of fc1/fc2 (4096 in torchvision); smaller values
    give the same architecture at a fraction of the cost, e.g. for tests.
    """

    num_classes: int = 1000
    hidden: int = 4096
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images; dropout is active only when train."""
        x = max_pool(nn.relu(conv(64, 11, "conv1", stride=4, padding=2, bias=True)(x)), 3, 2)
        x = max_pool(nn.relu(conv(192, 5, "conv2", padding=2, bias=True)(x)), 3, 2)
        x = nn.relu(conv(384, 3, "conv3", padding=1, bias=True)(x))
        x = nn.relu(conv(256, 3, "conv4", padding=1, bias=True)(x))
        x = max_pool(nn.relu(conv(256, 3, "conv5", padding=1, bias=True)(x)), 3, 2)
        x = flatten(adaptive_avg_pool(x, 6, 6))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)


# VGG-16 ("configuration D"): output channels of the convolutions in each block.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """torchvision's vgg16 (no batch norm): conv1_1..conv5_3, fc1..fc3 (138.4M parameters).

    ``hidden`` sets the width of fc1/fc2 (4096 in torchvision).
    """

    num_classes: int = 1000
    hidden: int = 4096
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images; dropout is active only when train."""
        for b, block in enumerate(VGG16_BLOCKS, start=1):
            for c, width in enumerate(block, start=1):
                x = nn.relu(conv(width, 3, f"conv{b}_{c}", padding=1, bias=True)(x))
            x = max_pool(x, 2, 2)
        x = flatten(adaptive_avg_pool(x, 7, 7))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc2")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc3")(x)


# MobileNetV2 inverted residual blocks 1..17 as (expansion t, output channels, stride),
# torchvision's settings (t, c, n, s) unrolled.
MOBILENET_V2_BLOCKS = tuple(
    (t, c, s if i == 0 else 1)
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )
    for i in range(n)
)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand_conv (1x1, absent when t=1), dw_conv (3x3 depthwise), project_conv (1x1)."""

    expansion: int
    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block; residual when the shape is kept."""
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = relu6(batch_norm(train, "expand_bn")(conv(hidden, 1, "expand_conv")(y)))
        y = conv(hidden, 3, "dw_conv", stride=self.stride, padding=1, groups=hidden)(y)
        y = relu6(batch_norm(train, "dw_bn")(y))
        y = batch_norm(train, "project_bn")(conv(self.features, 1, "project_conv")(y))
        return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0, 3.5M parameters): stem, block1..block17, head, classifier."""

    num_classes: int = 1000
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images; BatchNorm uses running statistics unless train."""
        x = relu6(batch_norm(train, "stem_bn")(conv(32, 3, "stem_conv", stride=2, padding=1)(x)))
        for i, (t, c, s) in enumerate(MOBILENET_V2_BLOCKS, start=1):
            x = InvertedResidual(t, c, s, name=f"block{i}")(x, train)
        x = relu6(batch_norm(train, "head_bn")(conv(1280, 1, "head_conv")(x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.num_classes, name="classifier")(x)
