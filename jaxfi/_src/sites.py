"""Sites: the places a fault can land, and selectors that pick them.

A site is described statically by a ``Site`` (name, shape, dtype, kind). The
three kinds are parameter leaves (named by pytree path), intermediate
activations (named by module path, primitive and occurrence) and inputs.
Selectors filter the candidate sites of their kind; a selection that matches
nothing is an error listing what exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxfi._src import bits as bits_lib

KINDS = ("params", "activations", "inputs")


@dataclasses.dataclass(frozen=True)
class Site:
    """A place a fault can land: its kind, stable name, shape and dtype.

    ``primitive`` names the operation that produced an activation site.
    """

    kind: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    primitive: str = ""

    @property
    def size(self) -> int:
        """Number of values."""
        return math.prod(self.shape)

    @property
    def format(self) -> bits_lib.Format:
        return bits_lib.format_of(self.dtype)

    @property
    def bits(self) -> int:
        """Number of bits held (values x width)."""
        return self.size * self.dtype.itemsize * 8


def path_name(path: tuple) -> str:
    """A pytree key path as a '/'-joined name, e.g. ``params/conv1/kernel``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _injectable(dtype) -> bool:
    return np.dtype(dtype) in bits_lib.SUPPORTED_DTYPES


def param_sites(params: Any) -> list[Site]:
    """Every array leaf of a parameter pytree as a site, in flattening order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [Site("params", path_name(p), tuple(np.shape(x)), np.dtype(x.dtype))
            for p, x in leaves if hasattr(x, "dtype")]


def _listing(sites: Sequence[Site], limit: int = 60) -> str:
    rows = [f"  {s.name}  {s.dtype.name}{list(s.shape)}" for s in sites[:limit]]
    if len(sites) > limit:
        rows.append(f"  ... and {len(sites) - limit} more")
    return "\n".join(rows) if rows else "  (none)"


def _dtypes(dtype) -> tuple[np.dtype, ...] | None:
    if dtype is None:
        return None
    if isinstance(dtype, (list, tuple, set, frozenset)):
        return tuple(np.dtype(d) for d in dtype)
    return (np.dtype(dtype),)


@dataclasses.dataclass(frozen=True)
class Selector:
    """Pick sites of one kind by name pattern, primitive, dtype or predicate.

    ``name`` is a regular expression searched in the site name; ``where`` is a
    predicate on the ``Site``; all given criteria must hold. Sites whose dtype
    cannot be faulted are never selected.
    """

    kind: str = "params"
    name: str | None = None
    primitive: str | tuple[str, ...] | None = None
    dtype: Any = None
    where: Callable[[Site], bool] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"site kind must be one of {KINDS}, got {self.kind!r}")
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as err:
                raise ValueError(f"site name pattern {self.name!r} is not a valid regex: {err}")
        if isinstance(self.primitive, list):
            object.__setattr__(self, "primitive", tuple(self.primitive))
        if isinstance(self.dtype, list):
            object.__setattr__(self, "dtype", tuple(self.dtype))

    def matches(self, site: Site) -> bool:
        """Whether ``site`` satisfies every criterion of this selector."""
        if site.kind != self.kind or not _injectable(site.dtype):
            return False
        if self.name is not None and not re.search(self.name, site.name):
            return False
        if self.primitive is not None:
            wanted = (self.primitive,) if isinstance(self.primitive, str) else self.primitive
            if site.primitive not in wanted:
                return False
        dtypes = _dtypes(self.dtype)
        if dtypes is not None and site.dtype not in dtypes:
            return False
        return self.where is None or bool(self.where(site))

    def select(self, candidates: Sequence[Site]) -> tuple[Site, ...]:
        """The matching sites, in candidate order; a ValueError if there are none."""
        chosen = tuple(s for s in candidates if self.matches(s))
        if not chosen:
            raise ValueError(
                f"selection {self.describe()} matches no {self.kind} site; available:\n"
                + _listing([s for s in candidates if s.kind == self.kind]))
        return chosen

    def describe(self) -> str:
        """A short human-readable form of the criteria."""
        parts = [f"{f}={getattr(self, f)!r}" for f in ("name", "primitive", "dtype", "where")
                 if getattr(self, f) is not None]
        return f"{self.kind}({', '.join(parts)})"


def Params(name: str | None = None, *, dtype: Any = None,
           where: Callable[[Site], bool] | None = None) -> Selector:
    """Select parameter leaves by path regex (e.g. ``r"conv1/kernel"``), dtype or predicate."""
    return Selector("params", name=name, dtype=dtype, where=where)


def Activations(name: str | None = None, *, primitive: str | Sequence[str] | None = None,
                dtype: Any = None, where: Callable[[Site], bool] | None = None) -> Selector:
    """Select intermediate values by name regex (module path), primitive, dtype or predicate."""
    return Selector("activations", name=name, primitive=primitive, dtype=dtype, where=where)


def Inputs(name: str | None = None, *, dtype: Any = None,
           where: Callable[[Site], bool] | None = None) -> Selector:
    """Select function inputs (``arg0``, ``arg1/...``) by name regex, dtype or predicate."""
    return Selector("inputs", name=name, dtype=dtype, where=where)
