"""`hpcml bench`: hpcml's speed, proven side by side with the loops people write by hand.

    from hpcml.bench import bench, doctor
    result = bench(suite="quick", out="runs/bench")      # writes JSON, Markdown and plots there
    print(result["goals"])
    doctor("runs/X/config.yaml")["hints"]
    plan("runs/X/config.yaml")["projections"]["25GbE"]   # efficiency at 2..1024 ranks

Cases (each reports hpcml and its baselines in the same run, as ratios): time-to-accuracy,
throughput, mfu, scaling, predict, breakdown, precision, busy, compress, serve (HTTP), images. Method: untimed
warm-up, synchronized timestamps, contenders interleaved over repeats, median with min/max, environment
recorded.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError

__all__ = ["bench", "benchmark", "doctor", "plan", "CASES", "SUITE_NAMES"]

CASES = (
    "time-to-accuracy",
    "throughput",
    "mfu",
    "scaling",
    "predict",
    "breakdown",
    "precision",
    "busy",
    "compress",
    "serve",
    "images",
)
SUITE_NAMES = ("quick", "full")
# cases the quick suite leaves out unless named with --cases (minutes of conv training on a CPU)
FULL_ONLY = ("images",)


def doctor(config: Any, *, steps: int = 30, nproc: int = 1) -> dict[str, Any]:
    """Step-time breakdown of a run config with hints (see `hpcml.bench.doctor.doctor`)."""
    from hpcml.bench.doctor import doctor as _doctor

    return _doctor(config, steps=steps, nproc=nproc)


def plan(config: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Data-parallel projection of a run config at 2..1024 ranks (see `hpcml.bench.planner.plan`)."""
    from hpcml.bench.planner import plan as _plan

    return _plan(config, **kwargs)


def parse_cases(names: Iterable[str] | None, suite: str = "full") -> list[str]:
    """Case names from the CLI (comma-separated or repeated; '_' for '-' allowed), in suite order;
    none named: every case of `suite` (the quick suite leaves out FULL_ONLY)."""
    if not names:
        return [c for c in CASES if suite == "full" or c not in FULL_ONLY]
    wanted = {n.strip().replace("_", "-") for item in names for n in item.split(",") if n.strip()}
    bad = sorted(wanted - set(CASES))
    if bad:
        raise UsageError(f"unknown bench case(s) {', '.join(bad)}; valid: {', '.join(CASES)}")
    return [c for c in CASES if c in wanted]


def environment(threads: int, device: str) -> dict[str, Any]:
    import torch

    import hpcml
    from hpcml.training.precision import available_cores, cpu_name

    return {
        "cpu": cpu_name(),
        "cores": available_cores(),
        "threads": threads,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "hpcml": hpcml.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
    }


def default_stem(kind: str = "bench") -> str:
    host = re.sub(r"[^A-Za-z0-9-]+", "-", platform.node()).strip("-") or "machine"
    return f"{kind}-{host}-{datetime.now(UTC).date().isoformat()}"


def bench(
    *,
    suite: str = "quick",
    cases: Iterable[str] | None = None,
    repeat: int | None = None,
    out: str | Path | None = "runs/bench",
    threads: int | None = None,
    device: str = "auto",
    stem: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the bench cases of `suite` (quick: under 3 minutes on 2 cores; full: ~10 minutes) and
    write `<stem>.json`, `<stem>.md` and plots under `out` (None: write nothing). Returns the result.
    """
    import torch

    from hpcml.bench import cases as c1
    from hpcml.bench import cases_parallel as c2
    from hpcml.bench.breakdown import breakdown_case
    from hpcml.bench.cases_busy import busy_case
    from hpcml.bench.cases_compress import compress_case
    from hpcml.bench.cases_precision import precision_case
    from hpcml.training.precision import available_cores

    if suite not in c1.SUITES:
        raise UsageError(f"unknown suite {suite!r}; valid: {', '.join(SUITE_NAMES)}")
    names = parse_cases(cases, suite)
    if repeat is not None and repeat < 1:
        raise UsageError(f"--repeat must be >= 1 (got {repeat})")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device=cuda but no CUDA device is available (torch {torch.__version__})")
    log = log or (lambda _msg: None)
    spec = c1.SUITES[suite]
    threads = threads or available_cores()
    run_case = {
        "time-to-accuracy": c1.time_to_accuracy,
        "throughput": c1.throughput,
        "mfu": c1.mfu,
        "scaling": c2.scaling,
        "predict": c2.predict_scaling,
        "breakdown": breakdown_case,
        "precision": precision_case,
        "busy": busy_case,
        "compress": compress_case,
        "serve": _serve_case,
        "images": _images_case,
    }
    env = environment(threads, device)
    t0 = time.perf_counter()
    threads_before = torch.get_num_threads()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hpcml-bench-") as scratch:
            ctx = c1.Context(spec, repeat or spec.repeat, threads, device, Path(scratch), log)
            for name in names:
                log(f"[{name}]")
                t = time.perf_counter()
                results[name] = run_case[name](ctx)
                results[name]["case_seconds"] = time.perf_counter() - t
                if results[name]["status"] != "ok":
                    log(f"  skipped: {results[name]['reason']}")
    finally:
        torch.set_num_threads(threads_before)
    env["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    _limits_from_breakdown(results)
    result = {
        "hpcml_bench": 1,
        "suite": suite,
        "cases_run": names,
        "environment": env,
        "config": {"repeat": repeat or spec.repeat, "threads": threads, "device": device},
        "cases": results,
        "goals": [{"case": k, **g} for k, v in results.items() for g in v.get("goals", [])],
        "wall_seconds": time.perf_counter() - t0,
    }
    if out is not None:
        from hpcml.bench.report import write

        result["files"] = [str(p) for p in write(result, Path(out), stem or default_stem())]
    return result


def _serve_case(ctx: Any) -> dict[str, Any]:
    """The serve case needs the `serve` extra; without it the case is skipped, not failed."""
    from hpcml.bench.cases import skipped

    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        return skipped("serve", "HTTP serving", f"needs {err.name}: pip install 'hpcml[serve]'")
    from hpcml.bench.cases_serve import serve_case

    return serve_case(ctx)


def _images_case(ctx: Any) -> dict[str, Any]:
    from hpcml.bench.cases_images import images_case

    return images_case(ctx)


def _limits_from_breakdown(results: dict[str, Any]) -> None:
    """Where the breakdown ran, a missed throughput or scaling goal also names the measured shares."""
    configs = results.get("breakdown", {}).get("configs", {})
    for case, key in (("throughput", "MLP, MNIST-1D"), ("scaling", "DDP 2 ranks")):
        b = next((v for k, v in configs.items() if k.startswith(key)), None)
        if b is None or case not in results:
            continue
        shares = ", ".join(f"{k} {v['fraction']:.0%}" for k, v in b["phases"].items() if v["fraction"])
        for g in results[case].get("goals", []):
            if g["met"] is False:
                g["note"] += f" (measured step: {shares})"


benchmark = bench  # `hpcml.benchmark(...)`: the package keeps the name `hpcml.bench`
