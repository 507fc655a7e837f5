"""Post-training int8 quantization: kernels stored as int8 with per-channel float32 scales.

``quantize(variables)`` replaces every ``kernel`` leaf of a variables pytree by
``kernel_q`` (int8) and ``kernel_scale`` (float32, one per output channel,
the kernel's last axis); biases and every other leaf stay as they are.
``dequantized_apply(apply_fn)`` computes ``kernel = kernel_q * kernel_scale``
inside the forward pass, so a fault in ``kernel_q`` is a fault in the stored
int8 representation::

    qparams = quantize(params)
    apply_q = dequantized_apply(apply_fn)
    logits = apply_q(qparams, images)
    plan = jaxfi.Plan(jaxfi.Params(r"kernel_q$"), jaxfi.BitFlip(), count=1)

The scheme is symmetric: ``scale = max|w| / 127`` per output channel and
``q = round(w / scale)`` in [-127, 127], so ``|w - q * scale| <= scale / 2``.
A bit flip can still make -128 (bit 7 set on 0): the int8 value range, never
a non-finite weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QMAX", "quantize", "dequantize", "dequantized_apply"]

QMAX = 127
_KERNEL, _Q, _SCALE = "kernel", "kernel_q", "kernel_scale"


def quantize(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` with every ``kernel`` leaf stored as int8 ``kernel_q`` and float32 ``kernel_scale``.

    Each output channel (the kernel's last axis: Dense ``(in, out)``, Conv
    ``HWIO``) gets ``scale = max|w| / 127`` (1 for an all-zero channel) and
    ``q = round(w / scale)``.

    Args:
      variables: a nested mapping of arrays (e.g. Flax variables); kernels
        must be floating with at least 2 dimensions.

    Returns:
      A new nested dict of the same shape but for the kernel leaves.

    Raises:
      ValueError: a ``kernel`` that is not floating or has fewer than 2
        dimensions, or variables that already hold ``kernel_q``.
    """
    out: dict[str, Any] = {}
    for name, value in variables.items():
        if isinstance(value, Mapping):
            out[name] = quantize(value)
        elif name == _KERNEL:
            out[_Q], out[_SCALE] = _quantize_kernel(np.asarray(value))
        elif name in (_Q, _SCALE):
            raise ValueError(f"variables already hold {name!r}: quantize a float model, not a quantized one")
        else:
            out[name] = value
    return out


def _quantize_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not np.issubdtype(kernel.dtype, np.floating) or kernel.ndim < 2:
        raise ValueError(f"a kernel must be a floating array with at least 2 dimensions, "
                         f"got {kernel.dtype} of shape {kernel.shape}")
    w = kernel.astype(np.float32)
    peak = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    scale = np.where(peak > 0, peak / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(qvariables: Mapping[str, Any]) -> dict[str, Any]:
    """The float variables that ``qvariables`` stand for: ``kernel = kernel_q * kernel_scale`` in float32.

    Jittable; used inside the forward pass by ``dequantized_apply``.

    Raises:
      ValueError: a module with ``kernel_q`` but no ``kernel_scale`` (or the reverse).
    """
    out: dict[str, Any] = {}
    for name, value in qvariables.items():
        if isinstance(value, Mapping):
            out[name] = dequantize(value)
        elif name not in (_Q, _SCALE):
            out[name] = value
    if (_Q in qvariables) != (_SCALE in qvariables):
        raise ValueError(f"a quantized module needs both {_Q!r} and {_SCALE!r}, got {sorted(qvariables)}")
    if _Q in qvariables:
        out[_KERNEL] = jnp.asarray(qvariables[_Q]).astype(jnp.float32) * qvariables[_SCALE]
    return out


def dequantized_apply(apply_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``apply_q(qvariables, x) = apply_fn(dequantize(qvariables), x)``: the int8 model's forward pass."""

    def apply_q(qvariables: Any, x: Any) -> jax.Array:
        """Logits of the model whose kernels are dequantized from int8 storage."""
        return apply_fn(dequantize(qvariables), x)

    return apply_q
