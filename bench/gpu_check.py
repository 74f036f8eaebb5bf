"""The GPU check, in one call: speed, accuracy and determinism of the CUDA path.

    python -m bench.gpu_check --pack                   # here: the data, gzipped, into .cache/gpu_data (12 MB)
    bash bench/gpu_check.sh                            # on the GPU machine (carry .cache/gpu_data): $OUT/gpu_check.json
    python -m bench.gpu_check --device cpu --tiny      # the CPU mode that CI runs, on a few batches

Needs only torch, numpy and tqdm (no MLflow, DVC, PyYAML or pandas): it runs the compute core
(pipeline.core.engine, model, data, runtime, graphs) on a bare GPU box. Each measurement is independent;
one that fails is recorded with its error and the others still run. Prints a table and writes
JSON after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.core import cuda_graphs, engine
from pipeline.core.model import build_model
from pipeline.core.runtime import autocast_dtype, make_deterministic, pick_device, tune_malloc
from pipeline.core.step import StepConfig
from pipeline.data.splits import load_split
from pipeline.params import ModelConfig, TrainConfig
from pipeline.tracking.tags import device_tags  # torch only: no MLflow on a bare GPU box

SPLITS = ("train", "val", "test")
PACKED = Path(".cache/gpu_data")
CPU_RESULT = Path("reports/metrics.json")  # the default run trained on this checkout's CPU (`make repro`), if there
# Else the default run as measured on a 2-core AMD EPYC in fp32 (`make repro`, 2026-12-05): reports/
# is DVC-cached, not in git (docs/caching.md), so a fresh clone on a GPU box has no metrics file.
CPU_REFERENCE = 0.9880
TOLERANCE_POINTS = 0.5  # docs/running-anywhere.md, "What is deterministic": CPU vs CUDA test accuracy
TUTORIAL = (ModelConfig(), TrainConfig())  # params.yaml's defaults: 10 epochs, batch 64
FAST = (
    ModelConfig(arch="fast", nf=16),
    TrainConfig(epochs=2, batch_size=256, lr=0.02, betas=[0.9, 0.999], schedule="onecycle"),
)
GOALS = {"tutorial_seconds": 15.0, "tutorial_accuracy": 0.985, "fast_seconds": 1.0, "fast_accuracy": 0.99}


class Notes(logging.Handler):
    """Collects what the engine logs about the fast path (captured, or why not)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "CUDA graph" in (msg := record.getMessage()):
            self.lines.append(msg)


NOTES = Notes()


def pack(data: Path, out: Path) -> None:
    """Gzip the processed splits for the trip to the GPU machine (56 MB -> 12 MB)."""
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with open(data / f"{split}.pt", "rb") as f, gzip.open(out / f"{split}.pt.gz", "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
    print(f"wrote {out}/{{{','.join(SPLITS)}}}.pt.gz; carry {out} to the GPU machine")


def load(data: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A processed split from `data`, as split.pt or split.pt.gz (checked as train checks it)."""
    path = data / f"{split}.pt"
    if not path.is_file() and (packed := data / f"{split}.pt.gz").is_file():
        with tempfile.TemporaryDirectory() as tmp, gzip.open(packed, "rb") as g:
            path = Path(tmp) / f"{split}.pt"
            with open(path, "wb") as f:
                shutil.copyfileobj(g, f)
            x, y = load_split(path)
    else:
        x, y = load_split(path)
    return (x[:limit], y[:limit]) if limit else (x, y)


def train(model_cfg: ModelConfig, cfg: TrainConfig, data: dict, device: torch.device, graphed: bool | None = None):
    """Train as the stage does (seeded weights built on the CPU); return model, per-epoch rows, seconds."""
    make_deterministic(cfg.seed)
    model = build_model(model_cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rows: list[dict] = []

    def on_epoch(row: dict, state: dict) -> None:
        test = engine.evaluate(model, *data["test"], batch_size=engine.EVAL_BATCH_SIZE)
        rows.append({**row, "test_accuracy": test["accuracy"]})

    NOTES.lines.clear()
    start = time.perf_counter()
    step = dataclasses.replace(StepConfig.of(cfg, device), cuda_graphs=graphed)
    engine.fit(model, data["train"], data["val"], cfg, step, on_epoch=on_epoch)
    wall = time.perf_counter() - start
    path = NOTES.lines[-1] if NOTES.lines else "eager (not tried here)"
    return model, rows, {"fit_wall_seconds": wall, "fast_path": path}


def tutorial(data: dict, device: torch.device, epochs: int | None) -> dict:
    model_cfg, cfg = TUTORIAL
    cfg = dataclasses.replace(cfg, epochs=epochs or cfg.epochs)
    a, rows, info = train(model_cfg, cfg, data, device)
    b, _, _ = train(model_cfg, cfg, data, device)  # the same config again: bit-identical?
    sa, sb = a.state_dict(), b.state_dict()
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "precision": "bf16" if autocast_dtype(cfg.precision, device) else "fp32",
        **info,
        "epoch_train_seconds": [round(r["train_seconds"], 3) for r in rows],
        "train_seconds": sum(r["train_seconds"] for r in rows),
        "test_accuracy": rows[-1]["test_accuracy"],
        "val_accuracy": rows[-1]["val_accuracy"],
        "two_runs_bit_identical": all(torch.equal(sa[k], sb[k]) for k in sa),
    }


def cpu_reference() -> tuple[float, str]:
    """The CPU's test accuracy of the default run, and where it comes from."""
    if CPU_RESULT.is_file():
        return json.loads(CPU_RESULT.read_text())["test_accuracy"], f"{CPU_RESULT} (the default run, trained here)"
    return CPU_REFERENCE, "the default run on a 2-core CPU (bench/gpu_check.py's CPU_REFERENCE)"


def cpu_agreement(result: dict, data: dict, cpu_epochs: int | None, tiny: bool = False) -> dict:
    """The CUDA run's test accuracy against the CPU's: a rerun with the same seed, or the committed one."""
    if cpu_epochs:
        cpu = tutorial(data, torch.device("cpu"), cpu_epochs)
        reference, source = cpu["test_accuracy"], f"CPU rerun here ({cpu_epochs} epochs, same seed)"
    else:
        reference, source = cpu_reference()
    diff = 100 * abs(result["test_accuracy"] - reference)
    return {
        "reference": source,
        "cpu_test_accuracy": reference,
        "device_test_accuracy": result["test_accuracy"],
        "difference_points": round(diff, 3),
        "tolerance_points": TOLERANCE_POINTS,
        "within": diff <= TOLERANCE_POINTS,
        "comparable": not tiny,  # a tiny run is not the 10-epoch recipe the reference trained
    }


def fast_recipe(data: dict, device: torch.device, seeds: list[int], epochs: int | None) -> dict:
    """Training seconds until test accuracy first reaches 99.0% (checked after each epoch)."""
    model_cfg, cfg = FAST
    out: dict = {}
    for graphed, seed in [(None, s) for s in seeds] + [(False, seeds[0])]:
        run_cfg = dataclasses.replace(cfg, seed=seed, epochs=epochs or cfg.epochs)
        _, rows, info = train(model_cfg, run_cfg, data, device, graphed)
        elapsed, reached = 0.0, None
        for r in rows:
            elapsed += r["train_seconds"]
            if reached is None and r["test_accuracy"] >= GOALS["fast_accuracy"]:
                reached = elapsed
        name = f"seed {seed}" + (" eager" if graphed is False else "")
        out[name] = {
            "seconds_to_99": reached,
            "train_seconds": elapsed,
            "test_accuracy": [r["test_accuracy"] for r in rows],
            "fast_path": info["fast_path"],
        }
    return out


def step_rates(data: dict, device: torch.device, steps: int) -> dict:
    """Images per second of full training steps: eager vs captured (CUDA graph), fp32 vs bf16 autocast."""
    out: dict = {}
    for model_cfg, cfg in (TUTORIAL, FAST):
        n = steps * cfg.batch_size
        x, y = data["train"][0][:n], data["train"][1][:n]
        if len(x) < n:
            raise ValueError(f"{steps} steps of {cfg.batch_size} need {n} images, have {len(x)}")
        for precision in ("fp32", "bf16"):
            for graphed in (False, True):
                make_deterministic(cfg.seed)
                model = build_model(model_cfg).to(device).to(memory_format=torch.channels_last)
                optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
                autocast = torch.bfloat16 if precision == "bf16" else None
                NOTES.lines.clear()
                step = StepConfig(cfg.batch_size, autocast)
                captured = cuda_graphs.capture(model, optimizer, x, y, step) if graphed else None
                training = engine.Training(model, optimizer, torch.Generator().manual_seed(0), captured=captured)
                engine.train_one_epoch(training, x, y, step, desc="rate")  # warm-up pass
                start = time.perf_counter()
                engine.train_one_epoch(training, x, y, step, desc="rate")
                rate = n / (time.perf_counter() - start)
                kind = "graph" if captured is not None else ("eager (capture failed)" if graphed else "eager")
                out[f"{model_cfg.arch} b{cfg.batch_size} {precision} {kind}"] = round(rate)
    return out


def environment(device: torch.device) -> dict:
    env = {
        **device_tags(device),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }
    if device.type == "cuda":  # device_tags has the driver (through nvidia-ml-py, if there)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cpu")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"processed splits (.pt or .pt.gz); default: data/processed, else {PACKED}",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench")), help="folder of gpu_check.json"
    )
    parser.add_argument("--tiny", action="store_true", help="a few batches and 1 epoch each: the CI run")
    parser.add_argument(
        "--cpu-epochs",
        type=int,
        default=0,
        help=f"also train on the CPU for this many epochs instead of comparing with {CPU_RESULT}",
    )
    parser.add_argument("--pack", action="store_true", help=f"gzip --data into {PACKED} for the trip, and stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("pipeline.core.cuda_graphs").addHandler(NOTES)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    logging.getLogger("pipeline.train").propagate = False  # the table says it; no per-epoch lines
    data_dir = args.data or next((p for p in (Path("data/processed"), PACKED) if p.is_dir()), Path("data/processed"))
    if args.pack:
        return pack(data_dir, PACKED)
    tune_malloc()
    device = pick_device(args.device, "--device")
    limit = 2048 if args.tiny else None
    data = {split: tuple(t.to(device) for t in load(data_dir, split, limit)) for split in SPLITS}
    results: dict = {"device": str(device), "tiny": args.tiny, "data": str(data_dir)}
    out = args.out / "gpu_check.json"

    def measure(name: str, fn: Callable[[], dict]) -> None:
        start = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # recorded; the other measurements still run
            results[name] = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {results['seconds'][name]} s", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    measure("environment", lambda: environment(device))
    measure("tutorial", lambda: tutorial(data, device, 1 if args.tiny else None))
    if "error" not in results["tutorial"]:
        measure("cpu_agreement", lambda: cpu_agreement(results["tutorial"], data, args.cpu_epochs, args.tiny))
    measure("fast_recipe", lambda: fast_recipe(data, device, [0] if args.tiny else [0, 1, 2], 1 if args.tiny else None))
    measure("step_rate", lambda: step_rates(data, device, 1 if args.tiny else 200))
    print(table(results))
    print(f"wrote {out}")


def table(r: dict) -> str:
    """The results as a two-column table (Markdown)."""
    rows = [("device", f"{r['device']}: " + ", ".join(f"{k} {v}" for k, v in r.get("environment", {}).items()))]
    t = r.get("tutorial", {})
    if "error" in t:
        rows.append(("tutorial recipe", t["error"]))
    elif t:
        goal = GOALS["tutorial_seconds"]
        rows.append(
            (
                f"tutorial recipe ({t['epochs']} epochs, batch {t['batch_size']}, {t['precision']})",
                f"{t['train_seconds']:.1f} s of training ({', '.join(f'{s:.2f}' for s in t['epoch_train_seconds'])} "
                f"per epoch; fit {t['fit_wall_seconds']:.1f} s with validation), test accuracy "
                f"{100 * t['test_accuracy']:.2f}% (moonshot: <= {goal:g} s, >= {100 * GOALS['tutorial_accuracy']}%)",
            )
        )
        rows.append(("fast path", t["fast_path"]))
        rows.append(
            ("two runs, same config", "bit-identical weights" if t["two_runs_bit_identical"] else "weights DIFFER")
        )
    if c := r.get("cpu_agreement"):
        if "error" in c:
            verdict = c["error"]
        else:
            within = "within" if c["within"] else "OUTSIDE"
            verdict = (
                f"{100 * c['cpu_test_accuracy']:.2f}% vs {100 * c['device_test_accuracy']:.2f}%: "
                f"{c['difference_points']:.2f} points ({within if c['comparable'] else 'a tiny run: not comparable to'}"
                f" the {c['tolerance_points']} stated; reference: {c['reference']})"
            )
        rows.append(("CPU vs this device, test accuracy", verdict))
    for name, f in (r.get("fast_recipe") or {}).items():
        if name == "error":
            rows.append(("fast recipe", f))
            continue
        reached = f"{f['seconds_to_99']:.2f} s to 99.0%" if f["seconds_to_99"] is not None else "did not reach 99.0%"
        rows.append(
            (
                f"fast recipe, {name}",
                f"{reached} (test {', '.join(f'{100 * a:.2f}%' for a in f['test_accuracy'])} "
                f"per epoch; {f['train_seconds']:.2f} s of training)",
            )
        )
    for name, rate in (r.get("step_rate") or {}).items():
        rows.append((f"step rate, {name}", rate if name == "error" else f"{rate:,} img/s"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(
        [f"| {'measurement':<{width}} | result |", f"| {'-' * width} | --- |"]
        + [f"| {a:<{width}} | {b} |" for a, b in rows]
    )


if __name__ == "__main__":
    main()
