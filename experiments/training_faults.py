# The code and documentation of this script live in jaxfi/experiments/training_faults.py,
# so that `pip install` also gives it as the command jaxfi-training-faults.
from jaxfi.experiments import training_faults

if __name__ == "__main__":
    training_faults.main()
