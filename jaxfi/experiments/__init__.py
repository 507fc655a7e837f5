"""The experiment scripts' code: each module defines its absl flags when asked and runs.

``experiments/NAME.py`` (the readable home of the scripts) and the console
commands ``jaxfi-NAME`` both call ``jaxfi.experiments.NAME.main``. Needs the
``experiments`` extra (absl-py, flax, optax, matplotlib).
"""
