"""One DDP rank: `python -m hpcml.launch.worker CONFIG OUT --quiet|--progress --resume|--fresh`,
started by launch.py. After an elastic restart (TORCHELASTIC_RESTART_COUNT > 0) the rank resumes from
the newest checkpoint in OUT when there is one.

Errors are reported as one line on stderr and in the elastic error file (so the launcher can name the
rank and its message), never as a bare traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


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


def main(argv: list[str]) -> int:
    from hpcml.config import load_config
    from hpcml.distributed.dist import DistInfo
    from hpcml.training.run import run_process

    cfg_path, out, mode, start = argv
    info = DistInfo.from_env()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    try:
        run_process(
            load_config(cfg_path),
            out=out,
            quiet=mode == "--quiet",
            dist=info,
            resume="auto" if restarted else start == "--resume",
        )
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
