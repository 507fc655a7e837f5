"""jaxfi: fault injection for JAX models.

Pure, keyed functions corrupt parameters, inputs and intermediate activations
bit-exactly and say exactly what they hit; campaigns batch thousands of
independent trials into one XLA program and report outcome rates with
confidence intervals.

The core needs only jax, numpy, ml_dtypes, scipy, pandas and tqdm. Public
modules: ``jaxfi.executors``, ``jaxfi.stats``, ``jaxfi.distributed``; with
extras, ``jaxfi.models`` and ``jaxfi.training`` (``models``), ``jaxfi.data``
(TFDS datasets: ``data``), ``jaxfi.study`` and ``jaxfi.experiments``
(``experiments``).
"""

from jaxfi import distributed, executors, stats
from jaxfi._src.activations import (
    activation_sites,
    capture,
    iteration_name,
    loop_iteration,
    named_scopes,
    sites_table,
)
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
    GroupedExecutor,
    LoopExecutor,
    MapExecutor,
    NotBitwiseError,
    VmapExecutor,
)
from jaxfi._src.fault_aware import (
    Optimizer,
    StepInfo,
    Stepped,
    TrainState,
    fault_aware_step,
    init_state,
    train_step,
)
from jaxfi._src.faults import BitFlip, Burst, Custom, FaultModel, RandomValue, StuckAt, Zero
from jaxfi._src.inject import Record, inject, population_of, sample_faults
from jaxfi._src.outcomes import Golden, sequence_outcomes
from jaxfi._src.plan import FaultList, Plan, Population
from jaxfi._src.protect import Bounds, record_bounds, restrict
from jaxfi._src.record import record_table
from jaxfi._src.sites import Activations, Inputs, ModuleOutput, Params, Selector, Site, param_sites
from jaxfi._src.stats import clopper_pearson, leveugle_sample_size, wilson
from jaxfi._src.store import CorruptChunkError, Store
from jaxfi._src.train_faults import (
    TRAINING_OUTCOMES,
    TrainingCampaign,
    TrainingGolden,
    TrainingResult,
    TrainingThresholds,
    classify_training,
    detector_scores,
    faulty_value_and_grad,
    spike_flags,
    training_sites_table,
)
from jaxfi._src.trial import faulty, input_sites, sites_of

__version__ = "0.1.0"

__all__ = [
    # bits and formats
    "SUPPORTED_DTYPES",
    "Format",
    "bit_mask",
    "clear_bits",
    "flip_bits",
    "format_of",
    "from_bits",
    "popcount",
    "set_bits",
    "to_bits",
    # fault models
    "FaultModel",
    "BitFlip",
    "Burst",
    "StuckAt",
    "RandomValue",
    "Zero",
    "Custom",
    # sites and selectors
    "Site",
    "Selector",
    "Params",
    "Activations",
    "ModuleOutput",
    "Inputs",
    "param_sites",
    "activation_sites",
    "input_sites",
    "sites_of",
    "sites_table",
    "named_scopes",
    "loop_iteration",
    "iteration_name",
    # plans and injection
    "Plan",
    "FaultList",
    "Population",
    "Record",
    "inject",
    "population_of",
    "sample_faults",
    "record_table",
    "faulty",
    "capture",
    # campaigns
    "Campaign",
    "Result",
    "TrialResult",
    "Golden",
    "sequence_outcomes",
    "Store",
    "CorruptChunkError",
    "AutoExecutor",
    "GroupedExecutor",
    "LoopExecutor",
    "MapExecutor",
    "VmapExecutor",
    "NotBitwiseError",
    "wilson",
    "clopper_pearson",
    "leveugle_sample_size",
    # training and protection
    "Optimizer",
    "TrainState",
    "StepInfo",
    "init_state",
    "fault_aware_step",
    "train_step",
    "Stepped",
    # faults during training
    "TRAINING_OUTCOMES",
    "TrainingCampaign",
    "TrainingGolden",
    "TrainingResult",
    "TrainingThresholds",
    "classify_training",
    "detector_scores",
    "faulty_value_and_grad",
    "spike_flags",
    "training_sites_table",
    "Bounds",
    "record_bounds",
    "restrict",
    # modules
    "distributed",
    "executors",
    "stats",
]
