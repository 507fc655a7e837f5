"""Optional dependencies: import them on first use, or say which jaxfi extra installs them.

``import jaxfi`` needs only jax, numpy, ml_dtypes, scipy, pandas and tqdm.
Models and training (flax, optax), TFDS data, plots, weight conversion and the
experiment scripts come with extras of the same names.
"""

from __future__ import annotations

import importlib
import types

EXTRAS = ("models", "data", "plots", "convert", "experiments")


def require(module: str, extra: str) -> types.ModuleType:
    """Imports ``module``, or raises an ImportError that names the jaxfi extra providing it.

    Args:
      module: the dotted module name, e.g. ``"flax.linen"``.
      extra: the extra of jaxfi that installs it, one of ``EXTRAS``.

    Returns:
      The imported module.

    Raises:
      ValueError: ``extra`` is not one of ``EXTRAS``.
      ImportError: ``module`` is not installed.
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {EXTRAS}, got {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is not installed; jaxfi installs it with the {extra!r} extra: "
            f"pip install 'jax-fault-injection[{extra}]'") from err
