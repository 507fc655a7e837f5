# The code and documentation of this script live in jaxfi/experiments/train.py,
# so that `pip install` also gives it as the command jaxfi-train.
from jaxfi.experiments import train

if __name__ == "__main__":
    train.main()
