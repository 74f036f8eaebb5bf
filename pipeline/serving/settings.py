"""The batching server's settings, checked by name; `python -m pipeline.serve` hands them to uvicorn's
worker processes through the environment. Standard library only: the command's own process (uvicorn's
supervisor) stays small, torch and the model live in the workers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

ENV = "PIPELINE_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    """What `python -m pipeline.serve` was asked for; each worker process reads it from $PIPELINE_SERVE_SETTINGS."""

    model: str
    workers: int
    max_images: int  # per call of the network
    max_wait_ms: float  # for more requests to join a call
    max_body_mb: float  # bigger bodies are refused (413) before they are read
    poll_s: float  # between reads of the alias; 0: never
    body_timeout_s: float  # for a request's whole body to arrive after its head; later: 408, connection closed
    head_timeout_s: float  # for a request's head to arrive whole (connections.py); later: 408, connection closed
    requests_per_connection: int = 0  # then the answer says `connection: close` (connections.py); 0: never

    def __post_init__(self) -> None:
        checks = {
            "workers": (self.workers >= 1, "at least 1"),
            "max_images": (self.max_images >= 1, "at least 1"),
            "max_wait_ms": (0 <= self.max_wait_ms <= 1000, "in [0, 1000]"),
            "max_body_mb": (self.max_body_mb > 0, "positive"),
            "poll_s": (self.poll_s >= 0, "0 (never) or more"),
            "body_timeout_s": (self.body_timeout_s > 0, "positive"),
            "head_timeout_s": (self.head_timeout_s > 0, "positive"),
            "requests_per_connection": (self.requests_per_connection >= 0, "0 (no limit) or more"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"--{key.replace('_', '-')} must be {expected}, got {getattr(self, key)}")

    def to_env(self) -> None:
        """Put them where each worker process reads them (from_env)."""
        os.environ[ENV] = json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        return cls(**json.loads(os.environ[ENV]))
