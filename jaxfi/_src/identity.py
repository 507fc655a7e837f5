"""Fingerprints of what determines a campaign's results, stable across processes.

A campaign's store is keyed by these, never by a function's name:

* ``program``: the jaxpr of ``apply_fn`` traced on the campaign's params and
  inputs (its text, which JAX prints without object addresses, plus the bytes
  of its constants). Two models bound the same way, two lambdas, or a function
  edited between runs differ here as soon as they compute differently. The
  text is printed without colour (``jaxpr_text``): JAX colours a jaxpr's
  ``str`` when stdout is a terminal, and a campaign is the same campaign
  whether its output goes to a terminal, a file or a pipe.
* ``fault_program``: a fault model's ``apply_raw`` (and ``combine`` for
  bit-granular models) traced on each site format, so a ``Custom`` function
  is identified by what it computes, closures and helpers included.
* ``code``: host functions (custom outcomes run on numpy, so they cannot be
  traced) by their bytecode, constants, names, defaults, closure cells and
  the module-level values and functions of their own module they read.
* ``arrays``: a pytree by paths, dtypes, shapes and bytes, with a readable
  shape summary.

Python's ``hash`` is salted per process, so nothing here uses it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import re
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfi._src.bits import Format

# An equation's primitive follows the type of its last output variable.
_PRIMITIVE = re.compile(r"\] = ([A-Za-z_]\w*)")
_SUMMARY_ARRAYS = 3  # pytrees with more leaves are summarised by counts
_ATOMS = (type(None), bool, int, float, complex, str, bytes)


def program(fn: Callable[..., Any], *args: Any) -> dict[str, str]:
    """The fingerprint of the program ``fn(*args)`` traces to.

    Args:
      fn: a JAX-traceable function.
      *args: example arguments (only their shapes and dtypes matter).

    Returns:
      ``{"sha256": ..., "equations": ...}``: a hash of the jaxpr text and
      constants, and its primitives with their counts (readable).
    """
    closed = jax.make_jaxpr(fn)(*args)
    text = jaxpr_text(closed)
    digest = hashlib.sha256(text.encode())
    for const in closed.consts:
        _update_array(digest, np.asarray(const))
    counts = collections.Counter(_PRIMITIVE.findall(text))
    return {"sha256": digest.hexdigest(),
            "equations": ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))}


def jaxpr_text(closed: Any) -> str:
    """A closed jaxpr printed as plain text, the same in every environment.

    ``str(jaxpr)`` adds ANSI colour codes when JAX decides it may colour
    (``jax_pprint_use_color``, on by default, and a stdout that is a
    terminal, a notebook or Colab, checked once when JAX is imported). Asked
    for without colour, the text equals ``str`` with output redirected,
    which keeps the fingerprints of stores written that way.

    Args:
      closed: a ``ClosedJaxpr`` (from ``jax.make_jaxpr``).

    Returns:
      The text.
    """
    return closed.pretty_print(use_color=False)


def colour_hint(stored: Any) -> str:
    """Why a stored config may differ from this campaign's: an empty hint
    unless the stored one holds a program fingerprint made from coloured text.

    Before fingerprints printed jaxprs without colour, a campaign started
    with stdout on a terminal hashed ANSI colour codes, which left its
    equation summary empty; such a store cannot be told apart from another
    campaign's, so it is refused, with this hint.

    Args:
      stored: a stored config (any JSON value).

    Returns:
      The hint (empty if none applies).
    """
    if not _coloured(stored):
        return ""
    return (" The stored program fingerprint has an empty equation summary: the store was probably written by "
            "a jaxfi that hashed the jaxpr as JAX printed it, in colour when stdout was a terminal, so the "
            "same campaign run with output redirected (or from another terminal setting) got another identity. "
            "Fingerprints no longer depend on the terminal. To resume that store, finish it with the jaxfi "
            "that wrote it, from a terminal; otherwise move it aside and run again into a new path (its "
            "trials are recomputed, bit for bit the same).")


def _coloured(stored: Any) -> bool:
    """Whether a program fingerprint in ``stored`` has a hash and an empty equation summary."""
    if isinstance(stored, dict):
        if set(stored) == {"sha256", "equations"} and stored["equations"] == "":
            return True
        return any(_coloured(v) for v in stored.values())
    return isinstance(stored, list) and any(_coloured(v) for v in stored)


def fault_program(fault: Any, formats: Iterable[Format]) -> str:
    """SHA-256 of the programs a fault model runs on raw bits of each format.

    Args:
      fault: a fault model (``apply_raw``, and ``combine`` when bit-granular).
      formats: the formats of the sites it acts on.

    Returns:
      A hex digest covering the traced ``apply_raw`` (and ``combine``) per
      format, in name order.
    """
    digest = hashlib.sha256()
    for fmt in sorted(set(formats), key=lambda f: f.name):
        raw = jnp.zeros((2,), fmt.uint)
        parts: dict[str, Callable[..., Any]] = {
            "apply_raw": lambda k, r, fmt=fmt: fault.apply_raw(k, r, fmt)}
        if fault.granularity == "bit":
            parts["combine"] = lambda k, r: fault.combine(r, r)
        for name, part in parts.items():
            digest.update(f"{fmt.name} {name}\n".encode())
            digest.update(program(part, jax.random.key(0), raw)["sha256"].encode())
    return digest.hexdigest()


def code(fn: Any) -> str:
    """SHA-256 of what a host function computes, as far as its code shows.

    Covers bytecode, constants and names (nested functions included),
    defaults, closure cells, ``functools.partial`` arguments, a bound
    method's instance, a callable object's ``__call__`` and attributes, and
    the module-level values and functions of the function's own module that
    it reads. Functions of other modules count by qualified name (their
    package versions are part of a campaign's identity). Bytecode differs
    between Python versions, so the Python version is part of it too.

    Args:
      fn: a callable.

    Returns:
      A hex digest.
    """
    digest = hashlib.sha256(f"python {sys.version_info[:2]}\n".encode())
    _feed(digest, fn, set())
    return digest.hexdigest()


def arrays(tree: Any) -> dict[str, str]:
    """The fingerprint of a pytree of arrays: a hash and a readable shape summary.

    Args:
      tree: a pytree whose leaves convert with ``np.asarray``.

    Returns:
      ``{"sha256": ..., "arrays": ...}``; the summary lists each leaf as
      ``path: dtype[shape]`` (``dtype[shape]`` for a single array), or counts
      for larger pytrees.
    """
    digest = hashlib.sha256()
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.extended):
            name += f" {leaf.dtype}"  # a PRNG key: its implementation and raw words
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf)
        digest.update(f"{name} ".encode())
        _update_array(digest, arr)
        leaves.append((name, arr))
    return {"sha256": digest.hexdigest(), "arrays": _shapes(leaves)}


def describe(obj: Any) -> str:
    """A repr that is stable across processes (functions by qualified name, not address).

    Args:
      obj: a dataclass (such as a Plan), function, partial, tuple, list or value.

    Returns:
      The description.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ", ".join(f"{f.name}={describe(getattr(obj, f.name))}"
                           for f in dataclasses.fields(obj))
        return f"{type(obj).__name__}({fields})"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return qualified(obj)
    if isinstance(obj, functools.partial):
        args = ", ".join([describe(obj.func)] + [describe(a) for a in obj.args]
                         + [f"{k}={describe(v)}" for k, v in sorted(obj.keywords.items())])
        return f"partial({args})"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(describe(x) for x in obj)
        return f"({inner},)" if isinstance(obj, tuple) and len(obj) == 1 else (
            f"({inner})" if isinstance(obj, tuple) else f"[{inner}]")
    return repr(obj)


def qualified(fn: Any) -> str:
    """``module.qualname`` of a function, or of an object's type.

    Args:
      fn: a function, type or object.

    Returns:
      The qualified name.
    """
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


def _shapes(leaves: list[tuple[str, np.ndarray]]) -> str:
    if not leaves:
        return "no arrays"
    if len(leaves) == 1 and not leaves[0][0]:
        return _shape(leaves[0][1])
    if len(leaves) <= _SUMMARY_ARRAYS:
        return ", ".join(f"{name}: {_shape(arr)}" for name, arr in leaves)
    dtypes = collections.Counter(arr.dtype.name for _, arr in leaves)
    values = sum(arr.size for _, arr in leaves)
    kinds = ", ".join(f"{n} {name}" for name, n in sorted(dtypes.items()))
    return f"{len(leaves)} arrays ({kinds}), {values} values"


def _shape(arr: np.ndarray) -> str:
    return f"{arr.dtype.name}[{','.join(map(str, arr.shape))}]"


def _update_array(digest: Any, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    digest.update(f"{arr.dtype.str} {arr.shape}\n".encode())
    digest.update(arr.reshape(-1).view(np.uint8))


def _feed(digest: Any, obj: Any, seen: set[int]) -> None:
    """Add a callable or value to ``digest``; ``seen`` breaks reference cycles."""
    if isinstance(obj, _ATOMS):
        digest.update(f"{type(obj).__name__}:{obj!r}\n".encode())
    elif isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        _update_array(digest, np.asarray(obj))
    elif id(obj) in seen:
        digest.update(b"<cycle>\n")
    else:
        seen.add(id(obj))
        _feed_object(digest, obj, seen)


def _feed_object(digest: Any, obj: Any, seen: set[int]) -> None:
    if isinstance(obj, types.FunctionType):
        _feed_function(digest, obj, seen)
    elif isinstance(obj, types.CodeType):
        _feed_code(digest, obj, seen)
    elif isinstance(obj, functools.partial):
        for part in (obj.func, obj.args, obj.keywords):
            _feed(digest, part, seen)
    elif isinstance(obj, types.MethodType):
        _feed(digest, obj.__func__, seen)
        _feed(digest, obj.__self__, seen)
    elif isinstance(obj, (tuple, list)):
        digest.update(f"{type(obj).__name__} {len(obj)}\n".encode())
        for item in obj:
            _feed(digest, item, seen)
    elif isinstance(obj, (dict, set, frozenset)):
        # Set iteration order follows the salted hash: feed sub-digests in sorted order.
        items = obj.items() if isinstance(obj, dict) else ((x, None) for x in obj)
        subs = sorted(_sub_digest((k, v), set(seen)) for k, v in items)
        digest.update(f"{type(obj).__name__} {' '.join(subs)}\n".encode())
    else:
        _feed_other(digest, obj, seen)


def _feed_other(digest: Any, obj: Any, seen: set[int]) -> None:
    """Modules, types and builtins by name; other objects by type, ``__call__`` and attributes."""
    if isinstance(obj, types.ModuleType):
        digest.update(f"module {obj.__name__}\n".encode())
        return
    digest.update(f"{qualified(obj)}\n".encode())
    if isinstance(obj, (type, types.BuiltinFunctionType)):
        return
    call = next((vars(k)["__call__"] for k in type(obj).__mro__ if "__call__" in vars(k)), None)
    if isinstance(call, types.FunctionType):
        _feed(digest, call, seen)
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict):
        _feed(digest, attributes, seen)


def _sub_digest(obj: Any, seen: set[int]) -> str:
    sub = hashlib.sha256()
    _feed(sub, obj, seen)
    return sub.hexdigest()


def _feed_function(digest: Any, fn: types.FunctionType, seen: set[int]) -> None:
    _feed(digest, fn.__code__, seen)
    _feed(digest, (fn.__defaults__, fn.__kwdefaults__), seen)
    _feed(digest, tuple(_contents(cell) for cell in fn.__closure__ or ()), seen)
    for name in sorted(_global_names(fn.__code__)):
        if name not in fn.__globals__:
            continue  # a builtin, or an attribute name
        value = fn.__globals__[name]
        digest.update(f"global {name}\n".encode())
        foreign = isinstance(value, (types.FunctionType, type)) and \
            getattr(value, "__module__", None) != fn.__module__
        if foreign:
            digest.update(f"{qualified(value)}\n".encode())
        else:
            _feed(digest, value, seen)


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return "<empty cell>"


def _feed_code(digest: Any, co: types.CodeType, seen: set[int]) -> None:
    # Names of locals, file names and line numbers do not change results.
    digest.update(f"code {co.co_argcount} {co.co_kwonlyargcount} {co.co_flags} "
                  f"{co.co_names}\n".encode())
    digest.update(co.co_code)
    for const in co.co_consts:
        _feed(digest, const, seen)


def _global_names(co: types.CodeType) -> set[str]:
    """Names a code object (and the code nested in it) may read as globals."""
    names = set(co.co_names)
    for const in co.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names
