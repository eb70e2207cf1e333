"""hpcml vs plain PyTorch (and Lightning) on MNIST-1D: now the `time-to-accuracy` and `throughput`
cases of `hpcml bench` (src/hpcml/bench/); this wrapper keeps the old entry point.

    python benchmarks/foundation.py [--suite quick|full] [--repeat N] [--out benchmarks/results]
"""

import sys

from hpcml.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--cases", "time-to-accuracy,throughput", *sys.argv[1:]]))
