"""Data-parallel scaling 1 -> N processes: now the `scaling` case of `hpcml bench`
(src/hpcml/bench/cases_parallel.py); this wrapper keeps the old entry point.

    python benchmarks/ddp_scaling.py [--suite quick|full] [--repeat N] [--out benchmarks/results]
"""

import sys

from hpcml.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--cases", "scaling", *sys.argv[1:]]))
