"""Reading fault records back as tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from jaxfi._src.inject import Record
from jaxfi._src.sites import Site


def _value(raw: int, site: Site):
    fmt = site.format
    return np.array([raw], dtype=np.uint64).astype(fmt.uint).view(fmt.dtype)[0]


def _positions(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(64) if (mask >> b) & 1)


def record_table(record: Record, sites: Sequence[Site]) -> pd.DataFrame:
    """One row per placed fault: trial, site, index (tuple), bits, before, after.

    ``sites`` are the population's sites (``jaxfi.population_of(...).sites`` or
    the ``sites`` a faulty function reports). A record with leading batch
    dimensions (from vmap) gets a ``trial`` column with the flat trial number.
    """
    arrays = {f: np.asarray(getattr(record, f)) for f in Record._fields if f != "overflow"}
    slots = arrays["valid"].shape[-1]
    flat = {f: a.reshape(-1, slots) for f, a in arrays.items()}
    rows = []
    for trial, slot in zip(*np.nonzero(flat["valid"])):
        site = sites[int(flat["site"][trial, slot])]
        mask = int(flat["mask"][trial, slot])
        bits = _positions(mask)
        rows.append({
            "trial": int(trial),
            "site": site.name,
            "kind": site.kind,
            "index": tuple(int(i) for i in np.unravel_index(int(flat["index"][trial, slot]), site.shape)),
            "bit": bits[0] if len(bits) == 1 else -1,
            "bits": bits,
            "before": _value(int(flat["before"][trial, slot]), site),
            "after": _value(int(flat["after"][trial, slot]), site),
            "before_bits": int(flat["before"][trial, slot]),
            "after_bits": int(flat["after"][trial, slot]),
        })
    columns = ["trial", "site", "kind", "index", "bit", "bits", "before", "after",
               "before_bits", "after_bits"]
    return pd.DataFrame(rows, columns=columns)
