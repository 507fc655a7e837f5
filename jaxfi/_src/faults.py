"""Fault models: what a fault does to one value, on raw bits.

A fault model is a small frozen dataclass. ``model(key, values)`` corrupts every
value of an array on its own; injection calls ``apply_raw`` on the raw bits of
the hit values only. Bit-granular models (a single bit flipped or stuck) also
expose ``positions`` and ``combine`` so that the sampled population can be the
individual bits of a site rather than its values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src import bits as bits_lib
from jaxfi._src.bits import BitSpec, Format

Granularity = str  # "bit" or "value"


class FaultModel:
    """Base class of the fault models.

    Every model implements ``apply_raw``. A model whose ``granularity`` is
    ``"bit"`` is sampled over individual bits (a ``ber`` plan draws bits, not
    values), and injection then needs two more methods from it: ``positions``,
    the bits it may hit, and ``combine``, which applies the drawn bits to a
    value (one call per value, with every drawn bit of that value in the mask).
    """

    granularity: Granularity = "value"

    def validate(self, fmt: Format) -> None:
        """Raises a ValueError if this model cannot act on ``fmt``."""

    def apply_raw(self, key: jax.Array, raw: jax.Array, fmt: Format) -> tuple[jax.Array, jax.Array]:
        """Corrupts every value of ``raw``.

        Args:
          key: the PRNG key of this fault.
          raw: the raw bits (unsigned integers of the format's width).
          fmt: the format of the values.

        Returns:
          (new raw bits, the mask of the bits targeted per value).
        """
        raise NotImplementedError

    def positions(self, fmt: Format) -> tuple[int, ...]:
        """The bit positions a bit-granular model may hit in ``fmt`` (bit 0 is the least significant).

        Raises:
          NotImplementedError: the model is not bit-granular.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a bit-granular fault model")

    def combine(self, raw: jax.Array, mask: jax.Array) -> jax.Array:
        """Applies the drawn bits ``mask`` to the raw bits ``raw`` (bit-granular models).

        Raises:
          NotImplementedError: the model is not bit-granular.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a bit-granular fault model")

    def __call__(self, key: jax.Array, values: jax.Array) -> jax.Array:
        """Applies this fault to every value of ``values``.

        Raises:
          ValueError: ``values`` is 64-bit while JAX runs without x64.
        """
        values = bits_lib.as_array(values, "values")
        fmt = bits_lib.format_of(values.dtype)
        self.validate(fmt)
        new, _ = self.apply_raw(key, bits_lib.to_bits(values), fmt)
        return bits_lib.from_bits(new, values.dtype)


class _BitSetField:
    """Stores a list-valued ``bits`` as a tuple so that models stay hashable (static under jit)."""

    def __post_init__(self):
        object.__setattr__(self, "bits", _hashable(self.bits))


class _ChosenBits(_BitSetField):
    """Bit models that act on ``n`` bits chosen from ``bits``: with ``n == 1``
    the sampled population is the individual bits of a site."""

    @property
    def granularity(self) -> Granularity:
        """"bit" with one bit per hit value, else "value"."""
        return "bit" if self.n == 1 else "value"

    def positions(self, fmt: Format) -> tuple[int, ...]:
        """The positions of ``bits`` in ``fmt``."""
        return fmt.bits(self.bits)

    def validate(self, fmt: Format) -> None:
        _check_n(self.n, self.positions(fmt), fmt, type(self).__name__)


def _one(fmt: Format, position) -> jax.Array:
    return jnp.left_shift(jnp.ones((), fmt.uint), position.astype(fmt.uint))


def _distinct_bit_masks(key: jax.Array, shape, positions: tuple[int, ...], n: int, fmt: Format) -> jax.Array:
    """Per value, a mask of ``n`` distinct bits drawn uniformly from ``positions``."""
    table = jnp.asarray(positions, jnp.int32)
    if n == len(positions):
        picks = jnp.broadcast_to(table, tuple(shape) + (n,))
    else:
        scores = jax.random.uniform(key, tuple(shape) + (len(positions),))
        picks = table[jax.lax.top_k(scores, n)[1]]
    # Distinct positions: the sum of their powers of two is their OR.
    return jnp.sum(_one(fmt, picks), axis=-1, dtype=fmt.uint)


def _check_n(n: int | None, positions: tuple[int, ...], fmt: Format, what: str) -> None:
    if n is not None and not 1 <= n <= len(positions):
        raise ValueError(
            f"{what}: n={n} bits requested but the bit set has {len(positions)} "
            f"bits in format {fmt.name}")


@dataclasses.dataclass(frozen=True)
class BitFlip(_ChosenBits, FaultModel):
    """Flip ``n`` distinct bits per hit value, drawn uniformly from ``bits``."""

    bits: BitSpec = "all"
    n: int = 1

    def combine(self, raw: jax.Array, mask: jax.Array) -> jax.Array:
        """Flips the bits of ``mask``."""
        return raw ^ mask

    def apply_raw(self, key, raw, fmt):
        mask = _distinct_bit_masks(key, raw.shape, self.positions(fmt), self.n, fmt)
        return self.combine(raw, mask), mask


@dataclasses.dataclass(frozen=True)
class Burst(_BitSetField, FaultModel):
    """Flip ``length`` adjacent bits lying inside ``bits``; the start is uniform."""

    length: int = 2
    bits: BitSpec = "all"

    def starts(self, fmt: Format) -> tuple[int, ...]:
        """The first bits of the runs of ``length`` adjacent bits that lie inside ``bits``."""
        allowed = set(fmt.bits(self.bits))
        return tuple(b for b in sorted(allowed)
                     if all(b + i in allowed for i in range(self.length)))

    def validate(self, fmt: Format) -> None:
        if self.length < 1 or not self.starts(fmt):
            raise ValueError(
                f"Burst: no run of {self.length} adjacent bits inside bit set "
                f"{self.bits!r} of format {fmt.name} (width {fmt.width})")

    def apply_raw(self, key, raw, fmt):
        starts = jnp.asarray(self.starts(fmt), jnp.int32)
        start = starts[jax.random.randint(key, raw.shape, 0, starts.shape[0])]
        run = fmt.uint.type((1 << self.length) - 1)
        mask = jnp.left_shift(jnp.full(raw.shape, run, fmt.uint), start.astype(fmt.uint))
        return raw ^ mask, mask


@dataclasses.dataclass(frozen=True)
class StuckAt(_ChosenBits, FaultModel):
    """Force bits to ``value`` (0 or 1): all of ``bits`` if ``n`` is None, else ``n`` random ones."""

    value: int = 0
    bits: BitSpec = "all"
    n: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.value not in (0, 1):
            raise ValueError(f"StuckAt value must be 0 or 1, got {self.value!r}")

    def combine(self, raw: jax.Array, mask: jax.Array) -> jax.Array:
        """Sets (value 1) or clears (value 0) the bits of ``mask``."""
        return raw | mask if self.value else raw & ~mask

    def apply_raw(self, key, raw, fmt):
        positions = self.positions(fmt)
        n = len(positions) if self.n is None else self.n
        mask = _distinct_bit_masks(key, raw.shape, positions, n, fmt)
        return self.combine(raw, mask), mask


@dataclasses.dataclass(frozen=True)
class RandomValue(FaultModel):
    """Replace the value by a uniformly random bit pattern (finite ones only if asked)."""

    finite_only: bool = False

    def apply_raw(self, key, raw, fmt):
        new = jax.random.bits(key, raw.shape, fmt.uint)
        if self.finite_only and fmt.is_float:
            new = _finite_pattern(key, new, fmt)
        return new, raw ^ new


def _finite_pattern(key: jax.Array, new: jax.Array, fmt: Format) -> jax.Array:
    if fmt.width == 8:
        every = np.arange(256, dtype=np.uint8)
        finite = every[np.isfinite(every.view(fmt.dtype).astype(np.float32))]
        pick = jax.random.randint(jax.random.fold_in(key, 1), new.shape, 0, finite.size)
        return jnp.asarray(finite)[pick]
    # IEEE-like formats: finite exactly when the exponent is not all ones.
    nexp, shift = len(fmt.exponent), fmt.exponent[0]
    exponent = jax.random.randint(jax.random.fold_in(key, 1), new.shape, 0, 2**nexp - 1)
    exp_mask = fmt.uint.type(((1 << nexp) - 1) << shift)
    return (new & ~exp_mask) | jnp.left_shift(exponent.astype(fmt.uint), fmt.uint.type(shift))


@dataclasses.dataclass(frozen=True)
class Zero(FaultModel):
    """Replace the value by an all-zero bit pattern (+0 for floats)."""

    def apply_raw(self, key, raw, fmt):
        return jnp.zeros_like(raw), raw


@dataclasses.dataclass(frozen=True)
class Custom(FaultModel):
    """A user fault ``fn(key, values) -> values`` of the same shape and dtype."""

    fn: Callable[[jax.Array, jax.Array], jax.Array]

    def apply_raw(self, key, raw, fmt):
        values = bits_lib.from_bits(raw, fmt.dtype)
        out = jnp.asarray(self.fn(key, values))
        if out.shape != values.shape or out.dtype != values.dtype:
            raise ValueError(
                f"Custom fault function must return shape {values.shape} and dtype "
                f"{values.dtype}, got {out.shape} {out.dtype}")
        new = bits_lib.to_bits(out)
        return new, raw ^ new


def _hashable(spec: BitSpec) -> BitSpec:
    if isinstance(spec, (str, int, range)):
        return spec
    return tuple(spec)
