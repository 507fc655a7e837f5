"""Time to inject 100 single-bit flips into a 25M-parameter float32 pytree.

Prints, from one run: the median time of ``jit(inject)`` (faulty copy of the
selected leaves), of ``jit(inject)`` with the params donated (in-place
scatter), and of copying the pytree once, with their ratios.

    python benchmarks/inject.py
"""

import statistics
import time

import jax
import jax.numpy as jnp

import jaxfi

LEAVES = 10
LEAF = 2_500_000


def _median_seconds(fn, repeats: int = 7) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    params = {f"layer{i}": jnp.full((LEAF,), 0.5, jnp.float32) for i in range(LEAVES)}
    plan = jaxfi.Plan(jaxfi.Params(), jaxfi.BitFlip(), count=100)
    inject = jax.jit(jaxfi.inject, static_argnums=2)
    copy = jax.jit(lambda p: jax.tree.map(lambda x: x + 0.0, p))
    t_inject = _median_seconds(lambda: inject(jax.random.key(0), params, plan))
    t_copy = _median_seconds(lambda: copy(params))

    donated = jax.jit(jaxfi.inject, static_argnums=2, donate_argnums=1)
    state = {"p": jax.tree.map(jnp.copy, params), "k": 0}

    def step():
        state["k"] += 1
        state["p"], rec = donated(jax.random.key(state["k"]), state["p"], plan)
        return rec

    t_donated = _median_seconds(step)
    print(f"pytree: {LEAVES} x {LEAF:,} float32 = {LEAVES * LEAF / 1e6:.0f}M parameters, 100 single-bit flips")
    print(f"jit(inject)            {t_inject * 1e3:8.2f} ms")
    print(f"jit(inject), donated   {t_donated * 1e3:8.2f} ms")
    print(f"copy of the pytree     {t_copy * 1e3:8.2f} ms")
    print(f"inject / copy          {t_inject / t_copy:8.2f}x")
    print(f"donated inject / copy  {t_donated / t_copy:8.3f}x")


if __name__ == "__main__":
    main()
