"""A campaign's identity is the same with a terminal or not, whatever JAX's colour setting."""

from __future__ import annotations

import json
import os
import pathlib
import pty
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxfi
from jaxfi._src import identity

# One campaign with a store: writes what it saw to argv[2], then runs argv[3] trials.
SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
import jaxfi

def model(params, x):
    return jnp.tanh(x @ params["w"]) @ params["v"]

rng = np.random.default_rng(0)
params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "v": rng.normal(size=(3, 2)).astype(np.float32)}
x = rng.normal(size=(5, 4)).astype(np.float32)
campaign = jaxfi.Campaign(model, params, x, None, jaxfi.Plan(jaxfi.Params(), count=1), seed=3)
seen = {"isatty": sys.stdout.isatty(), "coloured": "\\x1b[" in str(jax.make_jaxpr(model)(params, x)),
        "config": campaign.config}
with open(sys.argv[2], "w") as f:
    json.dump(seen, f)
campaign.run(int(sys.argv[3]), executor="loop", chunk_size=2, store=sys.argv[1])
"""


def _env(tmp_path: pathlib.Path, colour: str) -> dict[str, str]:
    return {**os.environ, "JAX_PPRINT_USE_COLOR": colour, "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}


def _with_terminal(args: list[str], env: dict[str, str], cwd: pathlib.Path) -> int:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; its exit code."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=cwd)
        os.close(follower)
        while True:
            try:
                if not os.read(leader, 4096):
                    break
            except OSError:  # the terminal closed: the process is done
                break
        return process.wait(timeout=300)
    finally:
        os.close(leader)


def _redirected(args: list[str], env: dict[str, str], cwd: pathlib.Path) -> int:
    """Run ``args`` with stdout and stderr redirected to a file; its exit code."""
    with open(cwd / "log", "w") as log:
        return subprocess.run(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=cwd,
                               timeout=300).returncode


def test_a_store_resumes_across_terminal_redirect_and_colour_setting(tmp_path):
    script, store = tmp_path / "campaign.py", tmp_path / "store"
    script.write_text(SCRIPT)
    runs = [("terminal", "1", 4, _with_terminal), ("redirected", "1", 6, _redirected),
            ("terminal-no-colour", "0", 8, _with_terminal)]
    seen = {}
    for name, colour, trials, launch in runs:
        cwd = tmp_path / name  # another working directory each time
        cwd.mkdir()
        out = tmp_path / f"{name}.json"
        code = launch([sys.executable, str(script), str(store), str(out), str(trials)], _env(tmp_path, colour), cwd)
        log = (cwd / "log").read_text() if (cwd / "log").exists() else ""
        assert code == 0, f"{name} run failed: {log}"
        seen[name] = json.loads(out.read_text())
    # The first run really had a terminal on which JAX prints jaxprs in colour.
    assert seen["terminal"]["isatty"] and seen["terminal"]["coloured"]
    assert not seen["redirected"]["isatty"] and not seen["redirected"]["coloured"]
    assert seen["terminal-no-colour"]["isatty"] and not seen["terminal-no-colour"]["coloured"]
    assert seen["terminal"]["config"] == seen["redirected"]["config"] == seen["terminal-no-colour"]["config"]
    assert seen["terminal"]["config"]["program"]["equations"]  # parsed from plain text
    # Each later run resumed the store: it computed only the trials after the stored ones.
    chunks = sorted(p.name for p in (store / "chunks").iterdir())
    assert chunks == [f"{a:012d}-{a + 2:012d}.npz" for a in range(0, 8, 2)]


def test_jaxpr_text_has_no_colour_codes_and_equals_the_redirected_str():
    closed = jax.make_jaxpr(lambda x: jnp.sin(x) * 2)(jnp.ones(3))
    text = identity.jaxpr_text(closed)
    assert "\x1b[" not in text and text == closed.pretty_print(use_color=False)
    assert "\x1b[" in closed.pretty_print(use_color=True)  # what a terminal would have hashed
    assert identity.program(lambda x: jnp.sin(x) * 2, jnp.ones(3))["equations"] == "mul 1, sin 1"


def test_a_store_fingerprinted_from_coloured_text_is_refused_with_why_and_what_to_do(tmp_path):
    params = {"w": np.ones((2, 2), np.float32)}
    campaign = jaxfi.Campaign(lambda p, x: x @ p["w"], params, np.ones((3, 2), np.float32), None,
                              jaxfi.Plan(jaxfi.Params(), count=1))
    coloured = json.loads(json.dumps(campaign.config))
    coloured["program"] = {"sha256": "0" * 64, "equations": ""}
    jaxfi.Store(tmp_path / "old", coloured)
    with pytest.raises(ValueError, match="in colour when stdout was a terminal.*new path"):
        campaign.run(2, executor="loop", store=tmp_path / "old", quiet=True)
    other = json.loads(json.dumps(campaign.config)) | {"seed": 99}
    jaxfi.Store(tmp_path / "other", other)
    with pytest.raises(ValueError, match="different config") as refused:
        campaign.run(2, executor="loop", store=tmp_path / "other", quiet=True)
    assert "colour" not in str(refused.value)
