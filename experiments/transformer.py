# The code and documentation of this script live in jaxfi/experiments/transformer.py,
# so that `pip install` also gives it as the command jaxfi-transformer.
from jaxfi.experiments import transformer

if __name__ == "__main__":
    transformer.main()
