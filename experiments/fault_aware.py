# The code and documentation of this script live in jaxfi/experiments/fault_aware.py,
# so that `pip install` also gives it as the command jaxfi-fault-aware.
from jaxfi.experiments import fault_aware

if __name__ == "__main__":
    fault_aware.main()
