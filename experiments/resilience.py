# The code and documentation of this script live in jaxfi/experiments/resilience.py,
# so that `pip install` also gives it as the command jaxfi-resilience.
from jaxfi.experiments import resilience

if __name__ == "__main__":
    resilience.main()
