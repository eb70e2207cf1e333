"""One DDP rank: `python -m hpcml.launch.worker CONFIG OUT --quiet|--progress --resume|--fresh`,
started by launch/elastic.py; `run_rank` is the same entry for ranks that Ray actors run
(jobs/train_ray.py). After a restart (TORCHELASTIC_RESTART_COUNT > 0) the rank resumes from the newest
checkpoint in OUT when there is one.

Errors are reported as one line on stderr and in the elastic error file (so the launcher can name the
rank and its message), never as a bare traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcml.config import TrainConfig


def _write_error_file(exc: BaseException) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = (
        str(exc) if exc.__class__.__name__ in ("HpcmlError", "UsageError") else f"{type(exc).__name__}: {exc}"
    )
    data = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": traceback.format_exc(),
                "timestamp": str(int(time.time())),
                "hpcml_time_ns": str(time.time_ns()),
            },
        }
    }
    with open(path, "w") as f:
        json.dump(data, f)


def run_rank(cfg: TrainConfig, out: str, *, quiet: bool, resume: bool) -> None:
    """Train as the rank the launcher's environment names: RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE and MASTER_ADDR/MASTER_PORT (the rendezvous store; distributed/dist.py joins it).
    After a restart of the rank group the run resumes from the newest checkpoint, when there is one."""
    from hpcml.distributed.dist import DistInfo
    from hpcml.training.run import run_process

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    run_process(cfg, out=out, quiet=quiet, dist=DistInfo.from_env(), resume="auto" if restarted else resume)


def main(argv: list[str]) -> int:
    from hpcml.config import load_config
    from hpcml.distributed.dist import DistInfo

    cfg_path, out, mode, start = argv
    info = DistInfo.from_env()
    try:
        run_rank(load_config(cfg_path), out, quiet=mode == "--quiet", resume=start == "--resume")
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the rank exits 1
        _write_error_file(exc)
        print(f"hpcml: rank {info.rank}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's background threads can abort ("terminate called without an
    # active exception") when destroyed during it, turning a finished rank into a failed one.
    os._exit(code)
