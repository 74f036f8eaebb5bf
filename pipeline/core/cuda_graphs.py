"""The fast CUDA path: the training step on full batches captured once as a CUDA graph and
replayed. Imports torch only.

On a fast GPU a small batch's step is a hundred-odd kernel launches of a few microseconds of work
each: the CPU's launch overhead, not the GPU, sets the pace. Captured whole (gather the batch from
the resident dataset, forward, loss, backward, Adam with capturable=True, the epoch's sums), a
step is one graph launch. The last, short batch of an epoch runs eagerly on the same weights and
optimizer state, so every epoch covers the same images as the eager loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from pipeline.core.step import StepConfig, forward

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps before capture (side stream), as PyTorch's CUDA graphs notes do


class CapturedStep:
    """Replays the captured step on the batch of `idx`; keeps the epoch's sums on the device."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        images: torch.Tensor,
        labels: torch.Tensor,
        step: StepConfig,
    ) -> None:
        device = images.device
        self.model, self.optimizer, self.images, self.labels, self.step = model, optimizer, images, labels, step
        self.n = len(images)
        self.idx = torch.arange(step.batch_size, device=device)  # the graph's input: this batch's indices
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # batches replayed this epoch
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        # Adam reads lr and betas as tensors inside the graph; the scheduler keeps writing floats
        # into the param groups, copied into these before each replay.
        self.hyper = [
            (torch.tensor(g["lr"], device=device), *(torch.tensor(b, device=device) for b in g["betas"]))
            for g in optimizer.param_groups
        ]
        saved = _snapshot(model, optimizer)
        try:
            self._capture(device)
        except BaseException:
            _restore(model, optimizer, saved, back_to_eager=True)
            raise
        for g, old in zip(optimizer.param_groups, saved["groups"], strict=True):
            g["lr"], g["betas"] = old["lr"], old["betas"]  # floats again, for the scheduler and checkpoints

    def _capture(self, device: torch.device) -> None:
        for g, (lr, beta1, beta2) in zip(self.optimizer.param_groups, self.hyper, strict=True):
            g["capturable"] = True  # Adam's step count and bias corrections on the device
            g["lr"], g["betas"] = lr, (beta1, beta2)
        for state in self.optimizer.state.values():
            if "step" in state:  # resumed: the count moves to the device
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
        saved = _snapshot(self.model, self.optimizer)
        # Warm up on a side stream (cuBLAS/cuDNN handles, Adam's state), then undo what it changed.
        cuda = device.type == "cuda"
        stream = torch.cuda.Stream(device) if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        if cuda:
            torch.cuda.current_stream(device).wait_stream(stream)
        _restore(self.model, self.optimizer, saved)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        self.graph = record(self._step)
        # The gradients it writes live in the graph's memory pool; the eager short batch drops them
        # from .grad (zero_grad): keep them referenced for as long as the graph.
        self.grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]

    def _step(self) -> None:
        x, y = self.images[self.idx], self.labels[self.idx]  # (B, 1, 28, 28) uint8, (B,)
        logits, loss = forward(self.model, x, y, self.step, cache=False)
        loss.backward()
        self.optimizer.step()
        loss = loss.detach()
        self.loss_sum += loss * len(self.idx)
        self.correct += (logits.argmax(1) == y).sum()
        self.count += 1
        self.first_bad.copy_(torch.where((self.first_bad > self.n) & ~loss.isfinite(), self.count, self.first_bad))

    def start_epoch(self) -> None:
        for t in (self.loss_sum, self.correct, self.count):
            t.zero_()
        self.first_bad.fill_(self.n + 1)

    def run(self, idx: torch.Tensor) -> None:
        """One step on the full batch `idx`, at the param groups' current lr and betas."""
        self.idx.copy_(idx)
        for g, (lr, beta1, beta2) in zip(self.optimizer.param_groups, self.hyper, strict=True):
            lr.fill_(g["lr"])  # a few bytes each, no sync; the schedule may have changed them
            beta1.fill_(g["betas"][0])
            beta2.fill_(g["betas"][1])
        self.graph.replay()


def record(step: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """`step` captured as a CUDA graph (not run: `replay()` runs it)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def wanted(device: torch.device, world_size: int, requested: bool | None) -> bool:
    """Whether to try the captured step: asked for, or by default on CUDA with one process (DDP's
    gradient all-reduce is not captured here)."""
    if requested is None:
        return device.type == "cuda" and world_size == 1
    return requested and world_size == 1


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: StepConfig,
) -> CapturedStep | None:
    """The captured step, or None (logged once) where capture fails: train eagerly then."""
    try:
        captured = CapturedStep(model, optimizer, images, labels, step)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning("CUDA graph capture failed (%s: %s); training eagerly", type(e).__name__, reason)
        return None
    log.info("training step captured as a CUDA graph (batch %d); short last batches run eagerly", step.batch_size)
    return captured


def eager_optimizer_state(state: dict) -> dict:
    """An optimizer state dict as the eager loop loads it: a checkpoint of the captured path holds
    `capturable` Adam groups, whose step counts would otherwise be put on the device."""
    return {**state, "param_groups": [{**g, "capturable": False} for g in state["param_groups"]]}


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "tensors": [t.detach().clone() for t in (*model.parameters(), *model.buffers())],
        "state": {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
        "groups": [{k: g[k] for k in ("lr", "betas", "capturable")} for g in optimizer.param_groups],
    }


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, back_to_eager: bool = False) -> None:
    """Put weights, buffers and optimizer state back in place (same tensors: a graph may hold them)."""
    with torch.no_grad():
        for t, old in zip((*model.parameters(), *model.buffers()), saved["tensors"], strict=True):
            t.copy_(old)
    for p in list(optimizer.state):
        if back_to_eager:  # as it was: none for a fresh optimizer, the step counts on the CPU
            if p in saved["state"]:
                optimizer.state[p] = saved["state"][p]
            else:
                del optimizer.state[p]
        elif p in saved["state"]:
            for k, v in optimizer.state[p].items():
                v.copy_(saved["state"][p][k])
        else:  # created by the warm-up: kept (the graph must not allocate and zero it each replay), zeroed
            for v in optimizer.state[p].values():
                v.zero_()  # = a fresh Adam's state: step 0, both moments 0
    if back_to_eager:
        for g, old in zip(optimizer.param_groups, saved["groups"], strict=True):
            g.update(old)
    optimizer.zero_grad(set_to_none=True)
