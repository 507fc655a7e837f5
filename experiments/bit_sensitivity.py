# The code and documentation of this script live in jaxfi/experiments/bit_sensitivity.py,
# so that `pip install` also gives it as the command jaxfi-bit-sensitivity.
from jaxfi.experiments import bit_sensitivity

if __name__ == "__main__":
    bit_sensitivity.main()
