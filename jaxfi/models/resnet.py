"""ResNets: a CIFAR-style small ResNet and torchvision's ResNet-18/50."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxfi._src.extras import require
from jaxfi.models.layers import batch_norm, conv, max_pool

nn = require("flax.linen", "models")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block."""
        y = conv(self.features, 3, "conv1", stride=self.stride, padding=1)(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = conv(self.features, 3, "conv2", padding=1)(y)
        y = batch_norm(train, "bn2")(y)
        return nn.relu(y + _shortcut(x, self.features, self.stride, train))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1x1, 3x3 (strided), 1x1 x4 expansion."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block."""
        y = nn.relu(batch_norm(train, "bn1")(conv(self.features, 1, "conv1")(x)))
        y = conv(self.features, 3, "conv2", stride=self.stride, padding=1)(y)
        y = nn.relu(batch_norm(train, "bn2")(y))
        y = batch_norm(train, "bn3")(conv(self.features * 4, 1, "conv3")(y))
        return nn.relu(y + _shortcut(x, self.features * 4, self.stride, train))


def _shortcut(x: jax.Array, features: int, stride: int, train: bool) -> jax.Array:
    """Identity, or torchvision's downsample (1x1 strided conv + BN); called inside a compact block."""
    if stride == 1 and x.shape[-1] == features:
        return x
    y = conv(features, 1, "downsample_conv", stride=stride)(x)
    return batch_norm(train, "downsample_bn")(y)


def _stages(
    x: jax.Array,
    block: type[nn.Module],
    widths: Sequence[int],
    blocks_per_stage: Sequence[int],
    first_stride: int,
    train: bool,
) -> jax.Array:
    """Stages layer1.., block j of stage i named f"layer{i}_{j}"; stages after the first halve the size."""
    for i, (width, count) in enumerate(zip(widths, blocks_per_stage, strict=True), start=1):
        for j in range(count):
            stride = (first_stride if i == 1 else 2) if j == 0 else 1
            x = block(width, stride, name=f"layer{i}_{j}")(x, train)
    return x


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) for small inputs.

    depth = 6n + 2: a 3x3 stem conv, three stages of n basic blocks with
    ``widths`` channels (strides 1, 2, 2), global average pooling, fc.
    ResNet-8 (n=1, widths 16/32/64) has 78k parameters on 28x28x1.
    """

    num_classes: int = 10
    depth: int = 8
    widths: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images; BatchNorm uses running statistics unless train."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {self.depth}")
        n = (self.depth - 2) // 6
        x = nn.relu(batch_norm(train, "bn1")(conv(self.widths[0], 3, "conv1", padding=1)(x)))
        x = _stages(x, BasicBlock, self.widths, (n,) * len(self.widths), 1, train)
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class ImageNetResNet(nn.Module):
    """torchvision's ImageNet ResNet: 7x7 stem, max pool, four stages, avg pool, fc."""

    num_classes: int = 1000
    block: type[nn.Module] = BasicBlock
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images; BatchNorm uses running statistics unless train."""
        x = nn.relu(batch_norm(train, "bn1")(conv(64, 7, "conv1", stride=2, padding=3)(x)))
        x = max_pool(x, 3, 2, 1)
        x = _stages(x, self.block, (64, 128, 256, 512), self.blocks_per_stage, 1, train)
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


class ResNet18(ImageNetResNet):
    """torchvision's resnet18 (11.7M parameters)."""

    block: type[nn.Module] = BasicBlock
    blocks_per_stage: Sequence[int] = (2, 2, 2, 2)


class ResNet50(ImageNetResNet):
    """torchvision's resnet50 (25.6M parameters)."""

    block: type[nn.Module] = Bottleneck
    blocks_per_stage: Sequence[int] = (3, 4, 6, 3)
