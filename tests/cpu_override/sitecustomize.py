"""Test-only: make every Python process of a test run see the CPU named in HPCML_TEST_CPU_FLAGS.

`HPCML_TEST_CPU_FLAGS=avx2 make test` runs the whole suite (subprocesses, CLI runs and DDP ranks
included) as if on an AVX2-only CPU, so a machine with native bf16 also exercises the fp32 paths that
`--precision auto` takes elsewhere, and vice versa with `avx512_bf16`. tests/conftest.py puts this
folder first on PYTHONPATH when the variable is set; production code never reads it.
"""

import os

_flags = os.environ.get("HPCML_TEST_CPU_FLAGS")
if _flags:
    import hpcml._system as _system  # torch-free: the "imports nothing heavy" tests still hold

    _fixed = frozenset(_flags.replace(",", " ").split())
    _system.cpu_flags = lambda: _fixed  # before precision.py binds it by `from hpcml._system import`
