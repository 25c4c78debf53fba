"""The CLIs re-execute themselves once with huge-page malloc (Linux), keeping args and other tunables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
from lm2_jax import runtime
runtime.reexec_with_hugepage_malloc("probe_mod")
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra,want", [
    ({}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, "glibc.malloc.hugetlb=2"),  # already tuned: kept as is
    ({"LM2_NO_MALLOC_TUNING": "1"}, None),
])
def test_reexec_sets_the_tuning_once(tmp_path, extra, want):
    (tmp_path / "probe_mod.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LM2_NO_MALLOC_TUNING")}
    env.update(extra, PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-m", "probe_mod", "--a=1", "b c"], capture_output=True, text=True,
                       env=env, timeout=60, check=True)
    if not sys.platform.startswith("linux"):  # the tuning is glibc's: elsewhere the process is left alone
        want = extra.get("GLIBC_TUNABLES")
    lines = p.stdout.splitlines()
    assert len(lines) == 1, p.stdout  # one process printed: the re-executed one (or the untouched one)
    out = json.loads(lines[0])
    assert out == {"tunables": want, "argv": ["--a=1", "b c"]}
