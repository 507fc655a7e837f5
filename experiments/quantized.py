# The code and documentation of this script live in jaxfi/experiments/quantized.py,
# so that `pip install` also gives it as the command jaxfi-quantized.
from jaxfi.experiments import quantized

if __name__ == "__main__":
    quantized.main()
