"""Where a recipe's training time goes, measured side by side in one run: the network's ceiling
(bench/benchmark.py's synthetic-batch row: forward, backward and Adam only), our loop without
augmentation, our loop with the recipe's (both with its schedule and weight average), the same loop
with PyTorch's NaN fill of new tensors (its default under deterministic algorithms, which
make_deterministic turns off), and the augmentation alone (drawing and warping the same batches).
All in deterministic mode, as the train stage runs.

    python -m bench.augment_cost best              # bench/augment_cost_best.json
    python -m bench.augment_cost best --threads 1  # as each seed of `bench.sweep --seeds --jobs 2` trains

Needs data/processed. Rounds interleave the measurements and each keeps its best (a shared
machine only slows a measurement down). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from bench.benchmark import ceiling, cpu_model, make_model
from pipeline.common.system import cores
from pipeline.core import engine
from pipeline.core.augment import Augment
from pipeline.core.engine import batch_of, train_one_epoch
from pipeline.core.runtime import cpu_has_native_bf16, make_deterministic, tune_malloc
from pipeline.core.step import StepConfig
from pipeline.data.splits import load_split
from pipeline.params import ModelConfig, TrainConfig, configs
from pipeline.recipe import load_recipe


def loop(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    step: StepConfig,
    data: tuple[torch.Tensor, torch.Tensor],
    fill: bool = False,
) -> float:
    """Images per second of our train_one_epoch over `data` (a few hundred batches) in steps `step`,
    with the optimizer, schedule and weight average the recipe trains with (engine.start); `fill`:
    with PyTorch's NaN fill of each new tensor on, as before make_deterministic turned it off."""
    model = make_model(model_cfg, cfg.channels_last)
    training = engine.start(model, data, cfg, step, resume=None)
    images, labels = data
    warm = 3 * cfg.batch_size
    before = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        train_one_epoch(training, images[:warm], labels[:warm], step)
        start = time.perf_counter()
        train_one_epoch(training, images, labels, step)
        return len(images) / (time.perf_counter() - start)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before


def augmentation(step: StepConfig, images: torch.Tensor) -> float:
    """Images per second of batch_of alone (gather, draw, warp) over the same batches."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    start = time.perf_counter()
    for i in range(0, len(images), step.batch_size):
        batch_of(images, order[i : i + step.batch_size], step, generator)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a recipe in recipes/ with augmentation")
    parser.add_argument("--steps", type=int, default=100, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each measurement keeps its best")
    parser.add_argument("--threads", type=int, default=cores())
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_malloc()
    model_cfg, cfg = configs(load_recipe(args.recipe))
    make_deterministic(cfg.seed)  # as engine.build does for the train stage
    cfg = dataclasses.replace(cfg, device="cpu")
    step = StepConfig.of(cfg, torch.device("cpu"))
    images, labels = load_split(args.data / "train.pt")
    data = images[: args.steps * cfg.batch_size], labels[: args.steps * cfg.batch_size]
    bf16 = step.autocast is not None
    measures = {
        "ceiling (synthetic batch)": lambda: ceiling(model_cfg, cfg, args.steps, bf16, cfg.channels_last),
        "loop without augmentation": lambda: loop(model_cfg, cfg, dataclasses.replace(step, augment=Augment()), data),
        "loop with the recipe's augmentation": lambda: loop(model_cfg, cfg, step, data),
        "the same with PyTorch's fill": lambda: loop(model_cfg, cfg, step, data, fill=True),
        "augmentation alone": lambda: augmentation(step, data[0]),
    }
    rates = dict.fromkeys(measures, 0.0)
    load = [os.getloadavg()[0]]
    for r in range(1, args.rounds + 1):
        for name, measure in measures.items():
            rate = measure()
            rates[name] = max(rates[name], rate)
            print(f"round {r}: {name:40s} {rate:8.0f} img/s", flush=True)
        load.append(os.getloadavg()[0])
    step_time = 1 / rates["loop with the recipe's augmentation"]  # seconds an image, as the loop runs
    results: dict[str, Any] = {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "native_bf16": cpu_has_native_bf16(),
        "precision": step.precision,
        "threads": args.threads,
        "load_average_1min": [round(x, 2) for x in load],  # before the first round and after each
        "torch": torch.__version__,
        "recipe": args.recipe,
        "config": {"model": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(cfg)},
        "img_per_s": {k: round(v) for k, v in rates.items()},
        "ratios": {
            "loop with augmentation / ceiling": rates["loop with the recipe's augmentation"]
            / rates["ceiling (synthetic batch)"],
            "loop without augmentation / ceiling": rates["loop without augmentation"]
            / rates["ceiling (synthetic batch)"],
            "augmentation's share of the step time (alone)": (1 / rates["augmentation alone"]) / step_time,
            "augmentation's share of the step time (loop with / without)": 1
            - rates["loop with the recipe's augmentation"] / rates["loop without augmentation"],
            "loop with augmentation / the same with PyTorch's fill": rates["loop with the recipe's augmentation"]
            / rates["the same with PyTorch's fill"],
        },
    }
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=2))
    Path(f"bench/augment_cost_{args.recipe}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
