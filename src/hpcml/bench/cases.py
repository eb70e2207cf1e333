"""Bench cases 1-3: time to accuracy, training throughput, MFU. Shared context and goal helpers.

Every case returns a dict: name, title, status ("ok" | "skipped"), reason, metric, contenders (each
with its runs and a median/min/max summary, or the reason it was skipped), speedups (> 1 favours
hpcml), goals (target, value, met, and a note saying by how much a miss missed and what limits it).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcml.bench import baselines
from hpcml.bench.flops import datasheet_peak, measured_matmul_peak, train_step_flops
from hpcml.bench.timers import interleave, ratio, summarize

TARGET = 0.94
TARGET_HIGH = 0.985


@dataclass(frozen=True)
class Suite:
    name: str
    repeat: int
    target_epochs: int  # the cap, and the length of hpcml's cosine schedule: runs stop at the target
    throughput_epochs: int
    mfu_rows: int
    mfu_epochs: int
    scaling_rows: int
    scaling_epochs: int
    predict_rows: int
    breakdown_steps: int
    comm_batches: tuple[int, ...] = (512,)  # per-rank batches of the DDP communication measurement


SUITES = {
    "quick": Suite("quick", 1, 60, 2, 8192, 1, 16384, 1, 1_000_000, 20),
    "full": Suite("full", 3, 60, 5, 32768, 2, 65536, 2, 1_000_000, 60, (512, 2048, 8192)),
}


@dataclass
class Context:
    suite: Suite
    repeat: int
    threads: int
    device: str  # "cpu" or "cuda": every contender of a case runs on it
    scratch: Path
    log: Callable[[str], None] = print
    _data: tuple | None = field(default=None, repr=False)

    def mnist1d(self) -> tuple[torch.Tensor, ...]:
        """MNIST-1D normalized exactly as hpcml does it (one scalar mean/std fitted on train)."""
        if self._data is None:
            from hpcml.config import DataConfig
            from hpcml.data.preprocess import Normalizer
            from hpcml.data.sources import load_dataset

            cfg = DataConfig()
            data = load_dataset(cfg)
            norm = Normalizer.fit(data.x_train, method=cfg.normalize, per_feature=data.kind == "tabular")
            arrays = (norm(data.x_train), data.y_train, norm(data.x_test), data.y_test)
            self._data = tuple(torch.from_numpy(a) for a in arrays)
        return self._data

    def train(self, cfg: dict, *, nproc: int = 1):
        """hpcml's real training path (`hpcml.train`), into a scratch run dir that is removed after."""
        import hpcml

        with tempfile.TemporaryDirectory(dir=self.scratch, prefix="run-") as tmp:
            return hpcml.train(cfg, out=Path(tmp) / "run", quiet=True, nproc=nproc)


def goal(
    label: str, value: float | None, target: float, *, limit: str, unit: str = "x", at_most: bool = False
) -> dict[str, Any]:
    """A goal from the issue, checked against a measured ratio (>= target, or <= with `at_most`); a
    miss says by how much and why."""
    if value is None:
        met, note = None, "not measured (a contender was skipped or never reached the target)"
    elif (value <= target) if at_most else (value >= target):
        met, note = True, f"met: {value:.2f}{unit} {'<=' if at_most else '>='} {target:g}{unit}"
    else:
        met = False
        by = value / target - 1 if at_most else 1 - value / target
        sign = ">" if at_most else "<"
        note = f"missed by {by:.0%} ({value:.2f}{unit} {sign} {target:g}{unit}); limited by: {limit}"
    return {"goal": label, "target": target, "value": value, "met": met, "note": note}


def skipped(name: str, title: str, reason: str) -> dict[str, Any]:
    return {"name": name, "title": title, "status": "skipped", "reason": reason, "goals": []}


def _contenders(ctx: Context, make: Callable[[str], Callable[[int], dict]]) -> tuple[dict, dict]:
    """The runnable contenders (hpcml, plain, lightning if installed) and the skipped ones."""
    runnable = {"hpcml": make("hpcml"), "plain": make("plain")}
    pl, why = baselines.lightning()
    skips = {}
    if pl is None:
        skips["lightning"] = why
        ctx.log(f"  lightning: skipped: {why}")
    else:
        runnable["lightning"] = make("lightning")
    return runnable, skips


def _collect(runs: dict[str, list[dict]], skips: dict, key: str, *, higher: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {
            "summary": summarize([r[key] for r in rs], higher_is_better=higher),
            "epochs_median": statistics.median(r["epochs"] for r in rs),
            "runs": rs,
        }
    for name, why in skips.items():
        out[name] = {"skipped": why}
    return out


def _speedup(contenders: dict, other: str, *, higher: bool) -> float | None:
    """How many times better hpcml is than `other` (medians): > 1 favours hpcml."""
    if "summary" not in contenders.get(other, {}):
        return None
    h, o = contenders["hpcml"]["summary"]["median"], contenders[other]["summary"]["median"]
    return ratio(h, o) if higher else ratio(o, h)


def _log_run(ctx: Context, unit: str, key: str):
    def log(name: str, rep: int, r: dict) -> None:
        v = r[key]
        ctx.log(f"  repeat {rep + 1}: {name}: " + ("not reached" if v is None else f"{v:,.2f} {unit}"))

    return log


def _time_to(curve: list[list[float]], target: float) -> float | None:
    """Seconds (evaluation included) until the first epoch whose test accuracy reached `target`."""
    return next((t for t, acc in curve if acc >= target), None)


def time_to_accuracy(ctx: Context) -> dict[str, Any]:
    """Case 1: seconds to 94% and to 98.5% test accuracy on MNIST-1D, per-epoch evaluation included
    for every contender; no data loading. hpcml runs its default recipe (`hpcml train`, nothing
    changed) to its end; `plain` is the paper's CNN in a DataLoader loop, stopped at 94%; `plain tuned`
    is a hand-tuned DataLoader loop (baselines.TUNED) run to its end; Lightning trains the paper's CNN."""
    epochs = ctx.suite.target_epochs

    def make(name: str) -> Callable[[int], dict]:
        def run(rep: int) -> dict:
            seed = max(rep, 0)
            if name == "hpcml":
                cfg = {"seed": seed, "threads": ctx.threads, "device": ctx.device}
                if rep < 0:
                    cfg["epochs"] = 1  # the warm-up: one untimed epoch
                run_ = ctx.train(cfg)
                curve = [[m["elapsed_seconds"], m["test_accuracy"]] for m in run_.metrics]
                r = {
                    "epochs": run_.report["epochs"],
                    "test_accuracy": run_.report["test_accuracy"],
                    "curve": curve,
                }
                r["model"] = run_.report["model"]
                # default per-epoch checkpoints are part of what users get, so they stay timed
                r["checkpoint_seconds"] = (run_.report.get("checkpoints") or {}).get("seconds")
            elif name == "plain tuned":
                r = baselines.run_tuned(
                    ctx.mnist1d(), seed=seed, threads=ctx.threads, device=ctx.device, warmup=rep < 0
                )
            else:
                fn = baselines.run_plain if name == "plain" else baselines.run_lightning
                kw = {"seed": seed, "epochs": 1 if rep < 0 else epochs, "threads": ctx.threads}
                r = fn("cnn1d", ctx.mnist1d(), device=ctx.device, target=None if rep < 0 else TARGET, **kw)
            keep = ("epochs", "test_accuracy", "curve", "model", "checkpoint_seconds")
            out = {k: r[k] for k in keep if k in r}
            out["time_to_target"] = _time_to(r["curve"], TARGET)
            out["time_to_985"] = _time_to(r["curve"], TARGET_HIGH)
            out["epochs_run"] = len(r["curve"])
            # epochs to 94%, which the recipe-vs-loop split compares (all of them if never reached)
            out["epochs"] = next(
                (i + 1 for i, (_, a) in enumerate(r["curve"]) if a >= TARGET), len(r["curve"])
            )
            return out

        return run

    ctx.mnist1d()
    runnable, skips = _contenders(ctx, make)
    runnable = {**runnable, "plain tuned": make("plain tuned")}
    runs = interleave(runnable, repeats=ctx.repeat, on_result=_log_run(ctx, "s", "time_to_target"))
    contenders = _collect(runs, skips, "time_to_target", higher=False)
    for name, rs in runs.items():
        contenders[name]["to_985"] = summarize([r["time_to_985"] for r in rs])
        contenders[name]["final_accuracy"] = summarize(
            [r["test_accuracy"] for r in rs], higher_is_better=True
        )
    speed = {o: _speedup(contenders, o, higher=False) for o in ("plain", "lightning", "plain tuned")}
    h985, t985 = contenders["hpcml"]["to_985"]["median"], contenders["plain tuned"]["to_985"]["median"]
    speed_985 = ratio(t985, h985)
    final = contenders["hpcml"]["final_accuracy"]["median"]
    limit = _recipe_vs_loop(contenders)
    return {
        "name": "time-to-accuracy",
        "title": f"Time to {TARGET:.0%} and {TARGET_HIGH:.1%} test accuracy, MNIST-1D (hpcml: defaults)",
        "status": "ok",
        "metric": "seconds",
        "higher_is_better": False,
        "config": {
            "targets": [TARGET, TARGET_HIGH],
            "epoch_cap": epochs,
            "batch_size": baselines.BATCH,
            "eval": "included",
            "plain_tuned": baselines.TUNED,
        },  # fmt: skip
        "contenders": contenders,
        "speedups": speed,
        "speedup_985_vs_tuned": speed_985,
        "goals": [
            goal("time to 94%: >= 2x faster than plain PyTorch", speed["plain"], 2.0, limit=limit),
            goal("time to 94%: >= 3x faster than Lightning", speed["lightning"], 3.0, limit=limit),
            goal(
                "default recipe: final test accuracy >= 98.5% (median)",
                final,
                TARGET_HIGH,
                unit="",
                limit="the default model and schedule (models/cnn.py ConvNet1d, onecycle)",
            ),
            goal(
                "time to 98.5%: >= 2x faster than a hand-tuned plain loop",
                speed_985,
                2.0,
                limit=f"hpcml {h985 or float('nan'):.2f} s vs tuned loop {t985 or float('nan'):.2f} s; same "
                "architecture, so the gap is the recipe (fewer epochs) x the loop (no DataLoader)",
            ),
        ],
    }


def _recipe_vs_loop(contenders: dict) -> str:
    """Split each time-to-target speedup into fewer epochs (the recipe) x faster epochs (the loop)."""
    h = contenders["hpcml"]
    parts = []
    for name, c in contenders.items():
        if name == "hpcml" or "summary" not in c or c["summary"]["median"] is None:
            continue
        if h["summary"]["median"] is None:
            return "hpcml did not reach the target within the epoch cap"
        epochs = c["epochs_median"] / h["epochs_median"]
        per_epoch = (c["summary"]["median"] / c["epochs_median"]) / (
            h["summary"]["median"] / h["epochs_median"]
        )
        parts.append(f"vs {name}: {epochs:.2f}x fewer epochs x {per_epoch:.2f}x faster epochs")
    ckpt = [r.get("checkpoint_seconds") for r in h["runs"] if r.get("checkpoint_seconds") is not None]
    if ckpt:
        parts.append(
            f"hpcml's default checkpoints: {statistics.median(ckpt):.2f} s a run, final one included"
        )
    return "; ".join(parts) + " (small convolutions leave little per-epoch overhead to remove)"


def throughput(ctx: Context) -> dict[str, Any]:
    """Case 2: MLP training samples/s on MNIST-1D at batch 100, training steps only (no eval)."""
    epochs = ctx.suite.throughput_epochs

    def make(name: str) -> Callable[[int], dict]:
        def run(rep: int) -> dict:
            seed, n_epochs = max(rep, 0), (1 if rep < 0 else epochs)
            if name == "hpcml":
                cfg = {"model": {"name": "mlp"}, "epochs": n_epochs, "seed": seed, "threads": ctx.threads}
                cfg |= {"device": ctx.device, "batch_size": baselines.BATCH}
                rep_ = ctx.train(cfg).report
                return {"samples_per_second": rep_["samples_per_second"], "epochs": rep_["epochs"]}
            fn = baselines.run_plain if name == "plain" else baselines.run_lightning
            kw = {"seed": seed, "epochs": n_epochs, "threads": ctx.threads, "target": None}
            r = fn("mlp", ctx.mnist1d(), device=ctx.device, **kw)
            return {"samples_per_second": r["samples_per_second"], "epochs": r["epochs"]}

        return run

    ctx.mnist1d()
    runnable, skips = _contenders(ctx, make)
    runs = interleave(
        runnable, repeats=ctx.repeat, on_result=_log_run(ctx, "samples/s", "samples_per_second")
    )
    contenders = _collect(runs, skips, "samples_per_second", higher=True)
    speed = {o: _speedup(contenders, o, higher=True) for o in ("plain", "lightning")}
    limit = (
        "at batch 100 the MLP's matmuls are tiny, so per-step framework cost is a small share; what is "
        "left is the kernels themselves"
    )
    return {
        "name": "throughput",
        "title": f"MLP training throughput, MNIST-1D, batch {baselines.BATCH} (samples/s)",
        "status": "ok",
        "metric": "samples/s",
        "higher_is_better": True,
        "config": {"model": "mlp", "batch_size": baselines.BATCH, "epochs": epochs},
        "contenders": contenders,
        "speedups": speed,
        "goals": [
            goal("MLP throughput: >= 1.5x plain PyTorch", speed["plain"], 1.5, limit=limit),
            goal("MLP throughput: >= 2x Lightning", speed["lightning"], 2.0, limit=limit),
        ],
    }


def mfu_config(ctx: Context, *, rows: int, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Compute-bound: synthetic data, a wide MLP and a large batch (wider and larger on a GPU)."""
    gpu = ctx.device == "cuda"
    features, hidden, batch = (1024, 8192, 8192) if gpu else (1024, 2048, 1024)
    rows = rows * 8 if gpu else rows
    return {
        "data": {
            "name": "synthetic",
            "rows": rows + rows // 16,
            "features": features,
            "classes": 10,
            "test_fraction": 1 / 17,
        },
        "model": {"name": "mlp", "kwargs": {"hidden": hidden, "depth": 2}},
        "optim": {"name": "sgd", "lr": 0.01, "schedule": "constant"},
        "batch_size": batch,
        "epochs": epochs,
        "threads": ctx.threads,
        "device": ctx.device,
        "label_smoothing": 0.0,
        "seed": seed,
    }


def mfu(ctx: Context) -> dict[str, Any]:
    """Case 3: model FLOP/s of hpcml's training step on a compute-bound MLP over the peak: on CPU the
    best rate of a large fp32 matmul on the same threads, on GPU the datasheet peak (and the matmul)."""
    from hpcml.models.registry import create_model

    cfg = mfu_config(ctx, rows=ctx.suite.mfu_rows, epochs=ctx.suite.mfu_epochs)
    kw = cfg["model"]["kwargs"]
    model = create_model("mlp", input_shape=(cfg["data"]["features"],), num_outputs=10, **kw)
    b = cfg["batch_size"]
    step_flops = train_step_flops(model, torch.randn(b, cfg["data"]["features"]), torch.randint(0, 10, (b,)))
    flops_per_sample = step_flops / b

    def train(rep: int) -> dict:
        r = ctx.train(cfg if rep >= 0 else mfu_config(ctx, rows=2048, epochs=1)).report
        return {
            "samples_per_second": r["samples_per_second"],
            "precision": r["precision"],
            "device_name": r["device_name"],
            "epochs": r["epochs"],
        }

    def peak(rep: int) -> dict:
        dtype = (
            torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        )
        p = measured_matmul_peak(device=ctx.device, threads=ctx.threads, dtype=dtype)
        return {**p, "epochs": 0}

    precision = ctx.train(mfu_config(ctx, rows=2048, epochs=1)).report["precision"]
    runs = interleave({"hpcml": train, "matmul": peak}, repeats=ctx.repeat, warmup=False)
    sps = summarize([r["samples_per_second"] for r in runs["hpcml"]], higher_is_better=True)
    achieved = {k: (v if k in ("ok", "runs") or v is None else v * flops_per_sample) for k, v in sps.items()}
    best_peak = max(r["flops_per_second"] for r in runs["matmul"])
    device_name = runs["hpcml"][0]["device_name"]
    sheet = datasheet_peak(device_name, precision) if ctx.device == "cuda" else None
    value = ratio(achieved["median"], best_peak)
    ctx.log(f"  hpcml {achieved['median'] / 1e9:,.1f} GFLOP/s; matmul peak {best_peak / 1e9:,.1f} GFLOP/s")
    return {
        "name": "mfu",
        "title": "MFU, compute-bound MLP (synthetic, wide, large batch) through hpcml's step",
        "status": "ok",
        "metric": "FLOP/s",
        "higher_is_better": True,
        "config": cfg,
        "flops_per_step": step_flops,
        "flops_per_sample": flops_per_sample,
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode (forward + backward)",
        "precision": precision,
        "contenders": {
            "hpcml": {"summary": achieved, "samples_per_second": sps, "runs": runs["hpcml"]},
            "matmul peak": {
                "summary": summarize([r["flops_per_second"] for r in runs["matmul"]], higher_is_better=True),
                "runs": runs["matmul"],
            },
        },
        "measured_peak_flops": best_peak,
        "datasheet_peak_flops": sheet,
        "mfu_measured_peak": value,
        "mfu_datasheet": ratio(achieved["median"], sheet),
        "goals": [
            goal(
                "MFU: >= 60% of the measured matmul peak",
                value,
                0.60,
                unit="",
                limit="ReLU, bias, loss, optimizer and batch slicing run between the matmuls and are "
                "not counted; the backward's transposed matmuls run below the square-matmul rate",
            )
        ],
    }
