"""Sites: the places a fault can land, and selectors that pick them.

A site is described statically by a ``Site`` (name, shape, dtype, kind). The
three kinds are parameter leaves (named by pytree path), intermediate
activations (named by module path, primitive and occurrence) and inputs.
Selectors (``Params``, ``Activations``, ``ModuleOutput``, ``Inputs``) filter
the candidate sites of their kind; a selection that matches nothing is an error
listing what exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from jaxfi._src import bits as bits_lib


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
        """The bit layout of the dtype."""
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


def listing(sites: Sequence[Site], limit: int = 60) -> str:
    """The sites' names, dtypes and shapes, one per line (at most ``limit``), for error messages."""
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


class Selector:
    """Base class of the selectors: pick the sites of one kind that meet every criterion.

    A selector is a frozen dataclass, so that a plan holding it stays hashable
    (static under jit). Sites whose dtype cannot be faulted are never selected.
    Subclasses set ``kind`` and implement ``accepts``.
    """

    kind: ClassVar[str]
    dtype: Any
    where: Callable[[Site], bool] | None

    def accepts(self, site: Site) -> bool:
        """Whether ``site``, already of this selector's kind, meets its own criteria."""
        raise NotImplementedError

    def matches(self, site: Site) -> bool:
        """Whether ``site`` satisfies every criterion of this selector.

        Args:
          site: a candidate site of any kind.

        Returns:
          True when it is of this selector's kind, can be faulted, and meets
          the name, dtype, predicate and subclass criteria.
        """
        if site.kind != self.kind or not _injectable(site.dtype):
            return False
        dtypes = _dtypes(self.dtype)
        if dtypes is not None and site.dtype not in dtypes:
            return False
        if self.where is not None and not self.where(site):
            return False
        return self.accepts(site)

    def select(self, candidates: Sequence[Site]) -> tuple[Site, ...]:
        """The matching sites, in candidate order.

        Args:
          candidates: the sites to choose from.

        Returns:
          The chosen sites.

        Raises:
          ValueError: nothing matches; the message lists the sites of this kind.
        """
        chosen = tuple(s for s in candidates if self.matches(s))
        if not chosen:
            raise ValueError(
                f"selection {self.describe()} matches no {self.kind} site; available:\n"
                + listing([s for s in candidates if s.kind == self.kind]))
        return chosen

    def describe(self) -> str:
        """A short human-readable form of the criteria, e.g. ``Params(name='kernel')``."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"


def _check_pattern(what: str, pattern: str | None) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be a regex string or None, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} {pattern!r} is not a valid regex: {err}") from None


def _check_iterations(iterations: Any) -> None:
    if iterations is None:
        return
    if isinstance(iterations, (bool, np.bool_)) or not isinstance(iterations, (int, np.integer)):
        raise TypeError(f"iterations must be a positive integer or None, got {iterations!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be a positive integer or None, got {iterations!r}")


def _tupled(selector: Selector, field: str) -> None:
    """Store a list-valued field as a tuple, so that the selector stays hashable."""
    if isinstance(getattr(selector, field), list):
        object.__setattr__(selector, field, tuple(getattr(selector, field)))


def _name_matches(pattern: str | None, name: str) -> bool:
    return pattern is None or re.search(pattern, name) is not None


@dataclasses.dataclass(frozen=True)
class _ByName(Selector):
    """Sites of one kind by name regex, dtype or predicate."""

    name: str | None = None
    dtype: Any = None
    where: Callable[[Site], bool] | None = None

    def __post_init__(self):
        _check_pattern("site name pattern", self.name)
        _tupled(self, "dtype")

    def accepts(self, site: Site) -> bool:
        """Whether the site's name matches ``name``."""
        return _name_matches(self.name, site.name)


@dataclasses.dataclass(frozen=True)
class Params(_ByName):
    """Parameter leaves, by path regex (e.g. ``r"conv1/kernel"``), dtype or predicate.

    Attributes:
      name: a regular expression searched in the leaf's path
        (``params/conv1/kernel``); None: every leaf.
      dtype: a dtype or a tuple of dtypes the leaf must have.
      where: a predicate on the ``Site``.
    """

    kind: ClassVar[str] = "params"


@dataclasses.dataclass(frozen=True)
class Activations(Selector):
    """Intermediate values, by name regex (module path), primitive, dtype or predicate.

    Attributes:
      name: a regular expression searched in the site name
        (``{module path}/{primitive}:{occurrence}``); None: every value.
      primitive: the name of the producing primitive (``"max"``, ``"conv_general_dilated"``)
        or a tuple of names.
      dtype: a dtype or a tuple of dtypes the value must have.
      where: a predicate on the ``Site``.
      iterations: for values inside ``while_loop`` bodies (whose trip count
        is not static), the number of iterations a fault's iteration is
        drawn from; a fault drawn past the loop's actual trip count does not
        land. Scan and ``fori_loop`` bodies need none.
    """

    kind: ClassVar[str] = "activations"
    name: str | None = None
    primitive: str | tuple[str, ...] | None = None
    dtype: Any = None
    where: Callable[[Site], bool] | None = None
    iterations: int | None = None

    def __post_init__(self):
        _check_pattern("site name pattern", self.name)
        _tupled(self, "primitive")
        _tupled(self, "dtype")
        _check_iterations(self.iterations)

    def accepts(self, site: Site) -> bool:
        """Whether the value's name and producing primitive match."""
        if self.primitive is not None:
            wanted = (self.primitive,) if isinstance(self.primitive, str) else self.primitive
            if site.primitive not in wanted:
                return False
        return _name_matches(self.name, site.name)


@dataclasses.dataclass(frozen=True)
class ModuleOutput(Selector):
    """The output value(s) of a module: values produced inside it and used outside it.

    For a Linen ``Dense`` this is the bias add, whatever the module computes
    internally; ``ModuleOutput("CNN/conv1")`` picks the tensor that layer
    hands to the next.

    Attributes:
      path: a regular expression that must fully match a module path
        (``"CNN/conv1"``, ``r"CNN/conv\\d"``).
      dtype: a dtype or a tuple of dtypes the value must have.
      where: a predicate on the ``Site``.
      iterations: the bound on while loops' trip counts (see ``Activations``).
    """

    kind: ClassVar[str] = "activations"
    path: str
    dtype: Any = None
    where: Callable[[Site], bool] | None = None
    iterations: int | None = None

    def __post_init__(self):
        _check_pattern("module path pattern", self.path)
        _tupled(self, "dtype")
        _check_iterations(self.iterations)

    def accepts(self, site: Site) -> bool:
        """Whether the value leaves a module whose path fully matches ``path``."""
        return any(re.fullmatch(self.path, scope) for scope in getattr(site, "output_of", ()))


@dataclasses.dataclass(frozen=True)
class Inputs(_ByName):
    """Function inputs (``arg0``, ``arg1/...``), by name regex, dtype or predicate.

    Attributes:
      name: a regular expression searched in the input's name; None: every input.
      dtype: a dtype or a tuple of dtypes the input must have.
      where: a predicate on the ``Site``.
    """

    kind: ClassVar[str] = "inputs"
