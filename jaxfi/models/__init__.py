"""Flax Linen models under test, and the glue that turns them into ``apply_fn(params, x)``.

Small models (any small NHWC input, e.g. 28x28x1): ``mlp``, ``cnn``, ``lenet5``,
``resnet8``, ``resnet20``. ImageNet-scale models with torchvision's layer
shapes (224x224x3): ``alexnet``, ``vgg16``, ``resnet18``, ``resnet50``,
``mobilenet_v2``; ``jaxfi.models.convert`` loads torchvision weights into them.
``jaxfi.models.quantized`` stores any model's kernels as int8 with per-channel
scales, dequantized in the forward pass (faults in int8 storage).
``jaxfi.models.transformer``: a small decoder-only transformer (layers under
``nn.scan``) and a sorting task generated in code.

Every model is called as ``model.apply(variables, x, train=False)`` and
returns logits. A campaign wants a plain function of (params, inputs)::

    model = get_model("lenet5")
    variables = init_variables(model, (28, 28, 1))
    apply_fn, params = bind_inference(model, variables)
    logits = apply_fn(params, images)

``params`` is the whole variables pytree (``{'params': ..., 'batch_stats': ...}``),
so BatchNorm running statistics are fault sites too; select by pytree path to
leave them out.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src.extras import require
from jaxfi.models import transformer
from jaxfi.models.imagenet import VGG16, AlexNet, MobileNetV2
from jaxfi.models.resnet import ResNet, ResNet18, ResNet50
from jaxfi.models.small import CNN, MLP, LeNet5

nn = require("flax.linen", "models")

__all__ = [
    "MLP",
    "LeNet5",
    "ResNet",
    "AlexNet",
    "VGG16",
    "ResNet18",
    "ResNet50",
    "MobileNetV2",
    "MODELS",
    "get_model",
    "init_variables",
    "bind_inference",
    "param_count",
    "transformer",
]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "lenet5": LeNet5,
    "resnet8": functools.partial(ResNet, depth=8),
    "resnet20": functools.partial(ResNet, depth=20),
    "alexnet": AlexNet,
    "vgg16": VGG16,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
}
MODELS: list[str] = list(_REGISTRY)


def get_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The model registered as ``name``, with ``num_classes`` outputs (the model's default if None).

    Extra keyword arguments are model fields, e.g. ``get_model("mlp", hidden=(512,))``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return _REGISTRY[name](**kwargs)


def init_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Fresh variables for inputs of shape ``input_shape`` (one example, HWC)."""
    return _init(model, jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32))


# Modules are hashable dataclasses: a static model lets equal models share one compiled init.
@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, key: jax.Array, x: jax.Array) -> dict[str, Any]:
    return model.init(key, x, train=False)


def bind_inference(
    model: nn.Module, variables: dict[str, Any]
) -> tuple[Callable[[Any, jax.Array], jax.Array], dict[str, Any]]:
    """Returns ``(apply_fn, params)`` with ``apply_fn(params, x)`` giving inference-mode logits.

    ``params`` is ``variables`` itself; ``apply_fn`` is pure and not jitted, so
    it composes with the caller's jit, vmap or fault interceptors.
    """

    def apply_fn(params: Any, x: jax.Array) -> jax.Array:
        """Inference-mode logits (running BatchNorm statistics, no dropout)."""
        return model.apply(params, x, train=False)

    return apply_fn, variables


def param_count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(tree)))
