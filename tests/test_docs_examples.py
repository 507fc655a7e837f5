"""Every Python example of the README and the user guide runs as pasted.

The ```python blocks of README.md and docs/*.md are extracted and run, page
by page, in order, each page in a namespace of its own (a block may continue
from the blocks above it on its page) and a fresh working directory. A block
right after the line ``<!-- illustrative -->`` is an outline, not run. All
pages run in one Python process, so JAX, jaxfi and Flax are imported once.

Where an example is slow as written (thousands of trials, a model trained to
convergence), ``SMALL`` replaces a few literal strings of that page with
smaller settings; each replaced string must occur on its page, so an edited
example cannot silently escape its smaller setting.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
ILLUSTRATIVE = "<!-- illustrative -->"

# page -> [(text in the page, text run instead)], for speed only.
SMALL: dict[str, list[tuple[str, str]]] = {
    "README.md": [("run(trials=1000, quiet=True)", 'run(trials=50, executor="loop", quiet=True)')],
    "docs/campaigns.md": [
        ('training.train_or_load("lenet5", "runs/models")',
         'training.train_or_load("lenet5", "runs/models", epochs=1, log=None)'),
        ('data.load("mnist5k", "test"), 256)', 'data.load("mnist5k", "test"), 64)'),
        ('trials=2000, executor="auto", chunk_size=256', 'trials=200, executor="loop", chunk_size=256'),
        ('trials=2000, executor="auto", chunk_size=500', 'trials=200, executor="auto", chunk_size=50'),
        ('trials=200, executor="loop", quiet=True', 'trials=16, executor="loop", quiet=True'),
    ],
    "docs/sites.md": [("num_examples=256", "num_examples=16"),
                      ("jax.random.split(jax.random.key(1), 1000)", "jax.random.split(jax.random.key(1), 10)")],
    "docs/control_flow.md": [
        ("tf.Config()", "tf.Config(layers=2, dim=16, heads=2, mlp=32)"),
        ("tf.train(config, steps=300)", "tf.init(config), {}"),
        ("tf.sorting_task(64, config, seed=1)", "tf.sorting_task(8, config, seed=1)"),
        ('run(trials=1000, executor="loop")', 'run(trials=4, executor="loop", quiet=True)'),
    ],
}


def pages() -> list[str]:
    """README.md and every page of the guide (the API reference pages hold no examples)."""
    return ["README.md"] + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """The page's ```python blocks: (line of the code's first line, code, illustrative)."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            before = [line.strip() for line in lines[:i] if line.strip()]
            illustrative = bool(before) and before[-1] == ILLUSTRATIVE
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            found.append((i + 2, textwrap.dedent("\n".join(lines[i + 1:end])), illustrative))
            i = end
        i += 1
    return found


def runnable(page: str) -> list[tuple[int, str]]:
    """The blocks of ``page`` that run, with ``SMALL``'s replacements applied."""
    text = (REPO / page).read_text()
    for old, new in SMALL.get(page, []):
        if old not in text:
            raise AssertionError(f"{page}: SMALL replaces {old!r}, which the page no longer has: update SMALL")
        text = text.replace(old, new)
    return [(line, code) for line, code, illustrative in python_blocks(text) if not illustrative]


# Runs every page's blocks in one process; writes {page: {"error": str | None, "seconds": float}}.
_DRIVER = textwrap.dedent("""
    import contextlib, io, json, os, sys, time, traceback

    jobs, workdir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    results = {}
    for n, (page, blocks) in enumerate(jobs.items()):
        os.chdir(os.path.join(workdir, str(n)))
        namespace, began, error, printed = {"__name__": "__main__"}, time.perf_counter(), None, io.StringIO()
        for line, code in blocks:
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(code, f"{page}:{line}", "exec"), namespace)
            except BaseException:
                error = f"block at {page}:{line} failed:\\n" + traceback.format_exc()
                break
        results[page] = {"error": error, "seconds": time.perf_counter() - began,
                         "printed": printed.getvalue()[-2000:]}
    with open(out, "w") as f:
        json.dump(results, f)
""")


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict[str, dict]:
    """Runs every page's examples once; the results by page."""
    root = tmp_path_factory.mktemp("docs_examples")
    jobs = {page: runnable(page) for page in pages()}
    jobs = {page: blocks for page, blocks in jobs.items() if blocks}
    for n in range(len(jobs)):
        (root / str(n)).mkdir()
    out = root / "results.json"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs), str(root), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    results = json.loads(out.read_text())
    print({page: round(r["seconds"], 1) for page, r in results.items()})
    return results


@pytest.mark.parametrize("page", [p for p in pages() if any(not ill for _, _, ill in
                                                             python_blocks((REPO / p).read_text()))])
def test_examples_run(ran, page):
    assert page in ran
    assert ran[page]["error"] is None, ran[page]["error"]


def test_every_replacement_applies_and_readme_has_examples():
    for page in SMALL:
        runnable(page)  # raises if a replaced string is gone
    assert len(runnable("README.md")) >= 1
    assert all(page in pages() for page in SMALL)


def test_blocks_are_found_and_illustrative_ones_skipped():
    text = "a\n\n```python\nx = 1\n```\n\n<!-- illustrative -->\n```python\nundefined_name\n```\n"
    assert python_blocks(text) == [(4, "x = 1", False), (9, "undefined_name", True)]


def test_path_flags_expand_a_tilde():
    """`--data_dir=~/x`: bash leaves a `~` after `=` as it is, so every path flag goes through user_path."""
    from jaxfi.study.flags import user_path

    assert user_path("~/data") == os.path.expanduser("~/data") != "~/data"
    assert user_path(None) is None and user_path("") == "" and user_path("/abs") == "/abs"
    read = re.compile(r"\b(?:workdir|data_dir|weights|compilation_cache)\.value\b(?!\s*[!=]=)")  # not a comparison
    wrapped = re.compile(r"user_path\((?:defined|self)\.(?:workdir|data_dir|weights|compilation_cache)\.value\)")
    for path in [REPO / "jaxfi" / "study" / "flags.py", *sorted((REPO / "jaxfi" / "experiments").glob("*.py"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "flag_values" in line:
                continue
            assert len(read.findall(line)) == len(wrapped.findall(line)), (
                f"{path.relative_to(REPO)}:{number} reads a path flag without user_path: {line.strip()}")
