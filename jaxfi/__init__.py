"""jaxfi: fault injection for JAX models.

Pure, keyed functions corrupt parameters, inputs and intermediate activations
bit-exactly and say exactly what they hit; campaigns batch thousands of
independent trials into one XLA program and report outcome rates with
confidence intervals.
"""

from jaxfi._src import distributed
from jaxfi._src.activations import activation_sites, capture, module_output, named_scopes, sites_table
from jaxfi._src.bits import (
    SUPPORTED_DTYPES,
    Format,
    bit_mask,
    clear_bits,
    flip_bits,
    format_of,
    from_bits,
    popcount,
    set_bits,
    to_bits,
)
from jaxfi._src.campaign import Campaign, Result, TrialResult
from jaxfi._src.executors import (
    AutoExecutor,
    LoopExecutor,
    MapExecutor,
    NotBitwiseError,
    VmapExecutor,
)
from jaxfi._src.fault_aware import StepInfo, TrainState, fault_aware_step, init_state
from jaxfi._src.faults import Burst, Custom, FaultModel, RandomValue, StuckAt, Zero, BitFlip
from jaxfi._src.grouped import GroupedExecutor
from jaxfi._src.inject import Record, inject, population_of, sample_faults
from jaxfi._src.outcomes import Golden
from jaxfi._src.plan import Plan, Population
from jaxfi._src.protect import Bounds, record_bounds, restrict
from jaxfi._src.record import record_table
from jaxfi._src.sites import Activations, Inputs, Params, Selector, Site, param_sites
from jaxfi._src.stats import clopper_pearson, leveugle_sample_size, mean_ci, summarize, wilson
from jaxfi._src.store import CorruptChunkError, Store
from jaxfi._src.trial import faulty, input_sites, sites_of

__version__ = "0.1.0"
