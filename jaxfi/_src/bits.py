"""Bit-level views of numeric formats: widths, named bit sets, exact flips.

Every operation goes through the unsigned integer type of the same width, so
values are changed bit-exactly (a signalling NaN payload survives): floats are
never touched by floating-point arithmetic here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BitSpec = str | int | range | Iterable[int]

_UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}
_INTS = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)
_FLOATS = (
    np.float16, np.float32, np.float64, jnp.bfloat16,
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz,
    ml_dtypes.float8_e5m2fnuz, ml_dtypes.float8_e4m3b11fnuz, ml_dtypes.float8_e3m4,
    ml_dtypes.float8_e4m3, ml_dtypes.float8_e8m0fnu,
)
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in _FLOATS + _INTS)


@dataclasses.dataclass(frozen=True)
class Format:
    """Bit layout of a numeric dtype (bit 0 is the least significant bit)."""

    dtype: np.dtype
    width: int
    sign: tuple[int, ...]
    exponent: tuple[int, ...]
    mantissa: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.dtype.name

    @property
    def uint(self) -> np.dtype:
        """The unsigned integer dtype with this format's width."""
        return np.dtype(_UINT[self.width])

    @property
    def is_float(self) -> bool:
        return bool(self.exponent)

    def bits(self, spec: BitSpec = "all") -> tuple[int, ...]:
        """Resolve a bit set: "sign", "exponent", "mantissa", "all", a position,
        a range or an iterable of positions; sorted, distinct, validated."""
        if isinstance(spec, str):
            return self._named(spec)
        positions = (spec,) if isinstance(spec, (int, np.integer)) else tuple(spec)
        if not positions:
            raise ValueError(f"bit set is empty for format {self.name}")
        for b in positions:
            if not isinstance(b, (int, np.integer)) or isinstance(b, bool):
                raise TypeError(f"bit positions must be integers, got {b!r}")
            if not 0 <= b < self.width:
                raise ValueError(
                    f"bit {b} is outside format {self.name}, whose width is "
                    f"{self.width} (valid bits 0..{self.width - 1})")
        return tuple(sorted({int(b) for b in positions}))

    def _named(self, name: str) -> tuple[int, ...]:
        sets = {"all": tuple(range(self.width)), "sign": self.sign}
        if self.is_float:
            sets.update(exponent=self.exponent, mantissa=self.mantissa)
        if name not in sets:
            raise ValueError(
                f"unknown bit set {name!r} for format {self.name}; "
                f"allowed: {sorted(sets)}, a position, a range or a list")
        if not sets[name]:
            raise ValueError(f"format {self.name} has no {name} bits")
        return sets[name]


def format_of(dtype) -> Format:
    """The bit layout of ``dtype``; a clear error for unsupported formats."""
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        allowed = ", ".join(d.name for d in SUPPORTED_DTYPES)
        raise TypeError(f"dtype {dt.name} is not supported for bit faults; allowed: {allowed}")
    width = dt.itemsize * 8
    if width == 64:
        _check_canonical(dt, "")
    if dt in tuple(np.dtype(d) for d in _INTS):
        sign = (width - 1,) if np.issubdtype(dt, np.signedinteger) else ()
        return Format(dt, width, sign, (), ())
    info = ml_dtypes.finfo(dt)
    nmant, nexp = int(info.nmant), int(info.nexp)
    sign = (width - 1,) if 1 + nexp + nmant == width else ()
    return Format(dt, width, sign, tuple(range(nmant, nmant + nexp)), tuple(range(nmant)))


def _check_canonical(dtype: np.dtype, what: str) -> None:
    """Refuse a dtype that JAX would silently narrow (64-bit types without x64)."""
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"{what + ': ' if what else ''}dtype {dtype.name} needs 64-bit JAX: call "
            "jax.config.update('jax_enable_x64', True) first (without it JAX "
            "silently stores it as a 32-bit type)")


def check_x64(tree: Any, name: str) -> None:
    """Refuse array leaves whose dtype JAX would silently narrow (float64, int64, ... without x64).

    Python scalars are left alone: JAX gives them its default (weak) types.

    Args:
      tree: a pytree of arrays.
      name: the argument's name, for the error message.

    Raises:
      ValueError: naming the first such leaf by its path.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
            _check_canonical(np.dtype(leaf.dtype), f"{name}{jax.tree_util.keystr(path)}")


def as_array(x: Any, name: str = "x") -> jax.Array:
    """``x`` as a JAX array, refusing a dtype JAX would silently narrow.

    Args:
      x: an array, or anything ``jnp.asarray`` takes (Python scalars get
        JAX's default types).
      name: the argument's name, for the error message.

    Returns:
      ``jnp.asarray(x)``.

    Raises:
      ValueError: ``x`` is float64, int64 or uint64 while JAX runs without x64.
    """
    if hasattr(x, "dtype"):
        _check_canonical(np.dtype(x.dtype), name)
    return jnp.asarray(x)


def to_bits(x: jax.Array) -> jax.Array:
    """Reinterpret ``x`` as unsigned integers of the same width (exact)."""
    return jax.lax.bitcast_convert_type(x, format_of(x.dtype).uint)


def from_bits(raw: jax.Array, dtype) -> jax.Array:
    """Reinterpret unsigned integers ``raw`` as ``dtype`` (exact)."""
    fmt = format_of(dtype)
    if raw.dtype != fmt.uint:
        raise TypeError(f"raw bits for {fmt.name} must be {fmt.uint.name}, got {raw.dtype}")
    return jax.lax.bitcast_convert_type(raw, fmt.dtype)


def bit_mask(bits: Iterable[int], dtype) -> np.ndarray:
    """An unsigned mask of ``dtype``'s width with the given positions set."""
    fmt = format_of(dtype)
    mask = 0
    for b in fmt.bits(tuple(bits)):
        mask |= 1 << b
    return fmt.uint.type(mask)


def _mask_like(x: jax.Array, bits) -> jax.Array:
    fmt = format_of(x.dtype)
    if isinstance(bits, (jax.Array, np.ndarray)) and not isinstance(bits, np.integer):
        if bits.dtype != fmt.uint:
            raise TypeError(f"a mask for {fmt.name} must be {fmt.uint.name}, got {bits.dtype}")
        return bits
    return jnp.asarray(bit_mask(fmt.bits(bits), x.dtype))


def flip_bits(x: jax.Array, bits) -> jax.Array:
    """Flip ``bits`` (a bit set, or an unsigned mask array) of every value of ``x``."""
    x = as_array(x)
    return from_bits(to_bits(x) ^ _mask_like(x, bits), x.dtype)


def set_bits(x: jax.Array, bits) -> jax.Array:
    """Force ``bits`` of every value of ``x`` to 1 (stuck-at-1)."""
    x = as_array(x)
    return from_bits(to_bits(x) | _mask_like(x, bits), x.dtype)


def clear_bits(x: jax.Array, bits) -> jax.Array:
    """Force ``bits`` of every value of ``x`` to 0 (stuck-at-0)."""
    x = as_array(x)
    return from_bits(to_bits(x) & ~_mask_like(x, bits), x.dtype)


def popcount(raw: jax.Array) -> jax.Array:
    """Number of set bits of each unsigned value."""
    return jax.lax.population_count(raw)
