"""Small models for MNIST-sized NHWC inputs (any small spatial size works)."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxfi._src.extras import require
from jaxfi.models.layers import flatten, max_pool

nn = require("flax.linen", "models")


class MLP(nn.Module):
    """Fully connected ReLU network: fc1 .. fcN, the last one gives the logits."""

    num_classes: int = 10
    hidden: Sequence[int] = (256, 128)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images (train is accepted for a uniform interface)."""
        x = flatten(x)
        for i, width in enumerate(self.hidden, start=1):
            x = nn.relu(nn.Dense(width, name=f"fc{i}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)


class CNN(nn.Module):
    """Two 3x3 convolutions (16 and 32 channels, unpadded) each with 2x2 max
    pooling, then dense 128 and the logits: 108,618 parameters on 28x28x1 with
    10 classes, 94% of them in fc1 (the benchmark model of PyTorchFI-style
    comparisons)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images (train is accepted for a uniform interface)."""
        x = max_pool(nn.relu(nn.Conv(16, (3, 3), padding="VALID", name="conv1")(x)), 2, 2)
        x = max_pool(nn.relu(nn.Conv(32, (3, 3), padding="VALID", name="conv2")(x)), 2, 2)
        x = nn.relu(nn.Dense(128, name="fc1")(flatten(x)))
        return nn.Dense(self.num_classes, name="fc2")(x)


class LeNet5(nn.Module):
    """LeNet-5 style CNN: conv1-pool-conv2-pool-fc1-fc2-fc3, ReLU and max pooling.

    conv1 pads by 2 so a 28x28 input behaves like the original 32x32 one:
    61,706 parameters on 28x28x1 with 10 classes.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits for a batch of images (train is accepted for a uniform interface)."""
        x = nn.relu(nn.Conv(6, (5, 5), padding=((2, 2), (2, 2)), name="conv1")(x))
        x = max_pool(x, 2, 2)
        x = nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x))
        x = flatten(max_pool(x, 2, 2))
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(self.num_classes, name="fc3")(x)
