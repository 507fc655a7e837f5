"""The slim core: ``import jaxfi`` works without the extras, and a missing extra is named; the distribution name."""

import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent

# Blocks the extras' packages, as if only the core dependencies were installed.
_BLOCK = textwrap.dedent("""
    import importlib.abc, sys

    EXTRAS = ("flax", "optax", "absl", "tensorflow_datasets", "tensorflow", "array_record",
              "importlib_resources", "matplotlib", "safetensors")

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in EXTRAS:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocked())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def test_core_works_without_the_extras():
    proc = _run("""
        import jax, jax.numpy as jnp, numpy as np
        import jaxfi

        def apply_fn(params, x):
            return jnp.tanh(x @ params["w"]) @ params["v"]

        params = {"w": jnp.ones((4, 8)) / 4, "v": jnp.eye(8, 3)}
        x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)), jnp.float32)
        labels = np.argmax(np.asarray(apply_fn(params, x)), -1)
        plan = jaxfi.Plan(jaxfi.Params("w"), jaxfi.BitFlip(bits="exponent"), count=2)
        faulty_params, record = jaxfi.inject(jax.random.key(0), params, plan)
        assert int(record.count) == 2
        acts = jaxfi.Plan(jaxfi.Activations(primitive="tanh"), count=1)
        out, _ = jaxfi.faulty(apply_fn, acts)(jax.random.key(1), params, x)
        assert out.shape == (16, 3)
        result = jaxfi.Campaign(apply_fn, params, x, labels, plan, seed=0).run(8, executor="loop", quiet=True)
        assert len(result) == 8
        import jaxfi.stats, jaxfi.executors, jaxfi.distributed
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "[]"]


def test_a_missing_extra_is_named():
    proc = _run("""
        for module, extra in (("jaxfi.models", "models"), ("jaxfi.training", "models"),
                              ("jaxfi.study", "models"), ("jaxfi.experiments.resilience", "models")):
            try:
                __import__(module)
            except ImportError as err:
                assert f"pip install 'jax-fault-injection[{extra}]'" in str(err), (module, err)
            else:
                raise AssertionError(f"{module} imported without its extra")
        from jaxfi import distributed
        try:
            distributed.define_flags()
        except ImportError as err:
            assert "pip install 'jax-fault-injection[experiments]'" in str(err), err
        from jaxfi import data
        try:
            data.load("cifar10")
        except ImportError as err:
            assert "pip install 'jax-fault-injection[data]'" in str(err), err
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok"]


def test_the_distribution_name_is_ours_everywhere():
    """``jaxfi`` on the package index is another project: pyproject, its extras and the docs use our name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = project["name"]
    assert name == "jax-fault-injection"
    for extra, requirements in project["optional-dependencies"].items():
        for requirement in requirements:
            if "[" in requirement:  # an extra that pulls in other extras names this distribution
                assert requirement.split("[")[0] == name, (extra, requirement)
    for page in (REPO / "README.md", REPO / "docs" / "index.md"):
        text = page.read_text()
        assert f"pip install {name}" in text, page
        assert not re.search(r"pip install '?jaxfi\b", text), page
