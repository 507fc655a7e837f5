# The code and documentation of this script live in jaxfi/experiments/layer_sensitivity.py,
# so that `pip install` also gives it as the command jaxfi-layer-sensitivity.
from jaxfi.experiments import layer_sensitivity

if __name__ == "__main__":
    layer_sensitivity.main()
