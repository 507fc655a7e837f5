"""A small decoder-only transformer with its layers under ``nn.scan``, and a task for it.

The task is generated in code: sort ``length`` digits. A sequence is the
digits, a separator, then the digits sorted; the model reads it shifted by one
(teacher forcing) and is scored on the sorted half. ``apply_fn(params, tokens)``
returns the logits at those positions, ``[batch, length, vocab]``, so the
greedy token at each position is the argmax given the correct prefix.

The blocks are one Linen module scanned over ``layers`` (``nn.scan``, weights
stacked on a leading layer axis), as in scanned research models: a fault
campaign sees the layer weights as one leaf per kind and the block's
activations as loop sites whose iteration is the layer
(``Transformer/layers/scan:0/jaxpr/attn/...``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src.extras import require

nn = require("flax.linen", "models")
optax = require("optax", "models")

DIGITS = 10
SEPARATOR = DIGITS


@dataclasses.dataclass(frozen=True)
class Config:
    """Model and task sizes.

    Attributes:
      length: digits to sort.
      layers: scanned blocks.
      dim: model width.
      heads: attention heads.
      mlp: hidden width of each block's MLP.
      dtype: the computation (and inference weight) dtype: "float32" or "bfloat16".
    """

    length: int = 8
    layers: int = 4
    dim: int = 64
    heads: int = 4
    mlp: int = 128
    dtype: str = "float32"

    @property
    def vocab(self) -> int:
        """Digits and the separator."""
        return DIGITS + 1

    @property
    def context(self) -> int:
        """Tokens the model reads: the digits, the separator, all sorted digits but the last."""
        return 2 * self.length


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, residual; the ``nn.scan`` body."""

    config: Config

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        """One block on ``x`` [batch, context, dim] (the scan carry)."""
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        h = nn.LayerNorm(dtype=dtype, name="ln1")(x)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.MultiHeadDotProductAttention(num_heads=c.heads, dtype=dtype, name="attn")(h, h, mask=mask)
        x = x + h
        h = nn.LayerNorm(dtype=dtype, name="ln2")(x)
        h = nn.Dense(c.mlp, dtype=dtype, name="fc1")(h)
        h = nn.Dense(c.dim, dtype=dtype, name="fc2")(nn.gelu(h))
        return x + h, None


class Transformer(nn.Module):
    """Token and position embeddings, ``config.layers`` scanned blocks, a final norm and head."""

    config: Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits [batch, length, vocab] at the sorted half of ``tokens`` [batch, context]."""
        c, dtype = self.config, jnp.dtype(self.config.dtype)
        x = nn.Embed(c.vocab, c.dim, dtype=dtype, name="embed")(tokens)
        position = self.param("position", nn.initializers.normal(0.02), (c.context, c.dim))
        x = x + position.astype(dtype)
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=c.layers)
        x, _ = scanned(c, name="layers")(x, None)
        x = nn.LayerNorm(dtype=dtype, name="ln")(x)
        logits = nn.Dense(c.vocab, dtype=dtype, name="head")(x)
        return logits[:, c.length - 1:c.context - 1]


def sorting_task(n: int, config: Config, seed: int | tuple[int, ...] = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples: (tokens [n, context] int32, targets [n, length] int32, the sorted digits)."""
    digits = np.random.default_rng(seed).integers(0, DIGITS, (n, config.length), dtype=np.int32)
    targets = np.sort(digits, axis=1)
    separator = np.full((n, 1), SEPARATOR, np.int32)
    tokens = np.concatenate([digits, separator, targets[:, :-1]], axis=1)
    return tokens, targets


@functools.cache
def bind(config: Config) -> Callable[[Any, jax.Array], jax.Array]:
    """``apply_fn(params, tokens) -> logits`` for ``config`` (pure, not jitted; one per
    config, so that jitted callers compile it once)."""
    model = Transformer(config)

    def apply_fn(params: Any, tokens: jax.Array) -> jax.Array:
        """Logits at the sorted half of ``tokens``."""
        return model.apply(params, tokens)

    return apply_fn


def init(config: Config, seed: int = 0) -> Any:
    """Fresh float32 variables ``{"params": ...}``."""
    tokens = jnp.zeros((1, config.context), jnp.int32)
    return _init(Transformer(dataclasses.replace(config, dtype="float32")), jax.random.key(seed), tokens)


# Modules are hashable: equal models share one compiled init.
@functools.partial(jax.jit, static_argnums=0)
def _init(model: Transformer, key: jax.Array, tokens: jax.Array) -> Any:
    return model.init(key, tokens)


def cast(params: Any, dtype: str) -> Any:
    """``params`` with every floating leaf in ``dtype`` (e.g. bfloat16 weights)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy (in float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def train(config: Config, steps: int = 1500, batch_size: int = 128, learning_rate: float = 3e-3,
          seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Train in float32 on freshly generated sorting examples (AdamW, cosine decay).

    Returns:
      The variables (cast to ``config.dtype``) and metrics: the first and
      last steps' losses, seconds, and token and sequence accuracy on 1,000
      held-out examples.
    """
    began = time.perf_counter()
    fp32 = dataclasses.replace(config, dtype="float32")
    apply_fn = bind(fp32)
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, steps // 10, steps),
                     weight_decay=1e-2)
    params = init(config, seed)
    state = tx.init(params)

    @jax.jit
    def step(params, state, tokens, targets):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply_fn(p, tokens), targets))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        tokens, targets = sorting_task(batch_size, config, seed=(seed, i))
        params, state, loss = step(params, state, tokens, targets)
        losses.append(loss)
    params = cast(params, config.dtype)
    tokens, targets = sorting_task(1000, config, seed=2**32 - 1 - seed)
    token_acc, seq_acc = accuracy(bind(config), params, tokens, targets)
    return params, {"first_loss": float(losses[0]), "loss": float(losses[-1]),
                    "seconds": time.perf_counter() - began, "steps": steps,
                    "token_accuracy": token_acc, "sequence_accuracy": seq_acc}


@functools.partial(jax.jit, static_argnums=0)
def _greedy(apply_fn, params, tokens):
    return jnp.argmax(apply_fn(params, tokens), axis=-1)


def accuracy(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, tokens: np.ndarray,
             targets: np.ndarray) -> tuple[float, float]:
    """(token accuracy, sequence exact-match accuracy) of the greedy tokens."""
    right = np.asarray(_greedy(apply_fn, params, tokens)) == targets
    return float(right.mean()), float(right.all(axis=1).mean())
