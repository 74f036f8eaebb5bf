"""The batching server (`python -m pipeline.serve`): MLflow's scoring protocol plus binary bodies, one
network call for many requests, and the registry's alias followed while serving.

`/invocations` takes the JSON bodies of `mlflow models serve` (`dataframe_split`, `dataframe_records`,
`instances`, `inputs`) and CSV, and also `.npy` (`application/x-npy`) and raw uint8 pixels
(`application/octet-stream`, N x 784 bytes) that skip JSON; it answers the `classifier`'s columns as
MLflow does. Every body goes through the classifier's own checks (`to_batch`) before any work, and
every bad request gets a 4xx with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import logging
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import mlflow
import numpy as np
import orjson
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.version import VERSION
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline.common.system import cores
from pipeline.core.inference import Inference
from pipeline.data.datasets import IMAGE_SIZE
from pipeline.serving.batching import Batcher, BatchLimits
from pipeline.serving.champion import AliasWatch, one_line, resolve
from pipeline.serving.connections import open_connections
from pipeline.serving.pyfunc import PIXELS, PROBABILITIES, to_batch
from pipeline.serving.settings import ServeSettings

log = logging.getLogger("pipeline.serving.server")

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")  # MLflow's JSON keys, exactly one
TYPES = "application/json, text/csv, application/x-npy or application/octet-stream (N x 784 uint8 pixels)"
VERSION_HEADER = "X-Model-Version"


@dataclass(frozen=True)
class Served:
    """A loaded `classifier`: its network as the pyfunc runs it, its class names, and which model it is."""

    inference: Inference
    classes: np.ndarray  # (10,) object: the class name of each index
    version: str  # the registry version ("3"), or the URI for a model that is not from the registry
    uri: str

    def probabilities(self, x: torch.Tensor) -> tuple[np.ndarray, Served]:
        """Raw pixels (N, 1, 28, 28) -> (probabilities (N, 10) float32, self): what the batcher runs."""
        return self.inference.probabilities(x).numpy(), self


def load(uri: str, max_images: int) -> Served:
    """Load the `classifier` behind `uri` (an alias is resolved first) and warm it up at the batch sizes it will see."""
    fixed, version = resolve(uri)
    python_model = mlflow.pyfunc.load_model(fixed).unwrap_python_model()  # a DigitClassifier: load_context ran
    served = Served(python_model.inference, python_model.classes, version, fixed)
    for n in sorted({1, max_images}):  # the first call of a size builds oneDNN's kernels: not in a request
        served.probabilities(torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE))
    return served


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def from_json(body: bytes):
    """MLflow's JSON request -> what the classifier's predict receives (a list, an array or a DataFrame)."""
    try:
        request = orjson.loads(body)  # 4-5x faster than json.loads (a third of a one-image request's parsing)
    except orjson.JSONDecodeError as e:  # not JSON, not UTF-8, an integer beyond a float, nested over 1024 deep
        if str(e).startswith("depth limit exceeded"):  # MLflow answers 500 to this (RecursionError)
            raise BadRequest(400, "the JSON is nested too deep for images") from None
        raise BadRequest(400, f"the body is not valid JSON: {one_line(e)}") from None
    keys = [k for k in FORMATS if isinstance(request, dict) and k in request]
    if len(keys) != 1:
        raise BadRequest(400, f"the body must be a JSON object with exactly one of the keys {', '.join(FORMATS)}")
    data = request[keys[0]]
    try:
        if keys[0] == "dataframe_split":
            if not isinstance(data, dict) or "data" not in data or set(data) - {"columns", "data", "index"}:
                raise BadRequest(400, "dataframe_split must be an object with 'data' (and 'columns', 'index')")
            return pd.DataFrame(data=data["data"], columns=data.get("columns"), index=data.get("index"))
        if keys[0] == "dataframe_records":
            if not isinstance(data, list):
                raise BadRequest(400, "dataframe_records must be a list of records")
            return pd.DataFrame(data=data)
    except (ValueError, TypeError) as e:  # ragged rows, a bad index
        raise BadRequest(400, f"{keys[0]} is not a table: {one_line(e)}") from None
    return data if isinstance(data, list | dict) else np.asarray(data)


def from_npy(body: bytes) -> np.ndarray:
    """A .npy body -> its array, its header checked first: numpy allocates what the header declares."""
    buffer = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
        shape, _, dtype = read_header[version](buffer)
        if dtype.hasobject:  # would need unpickling
            raise ValueError("an array of Python objects")
        if math.prod(shape) * dtype.itemsize > len(body):
            raise ValueError(f"its header declares {shape} {dtype}, more than the body holds")
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadRequest(400, f"the body is not a .npy array: {one_line(e)}") from None


def from_body(body: bytes, content_type: str):
    """Any accepted body -> what the classifier's predict receives; BadRequest for anything else."""
    mime, *parameters = [p.strip().lower() for p in content_type.split(";")]
    options = dict(p.partition("=")[::2] for p in parameters)
    if options.get("charset", "utf-8") != "utf-8" or set(options) - {"charset"}:
        raise BadRequest(415, f"unsupported content type parameters {';'.join(parameters)!r}: only charset=utf-8")
    if mime == "application/json":
        return from_json(body)
    if mime == "text/csv":
        try:
            return pd.read_csv(io.BytesIO(body))
        except (ValueError, UnicodeDecodeError) as e:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise BadRequest(400, f"the body is not CSV with a header row: {one_line(e)}") from None
    if mime == "application/x-npy":
        return from_npy(body)
    if mime == "application/octet-stream":
        if not body or len(body) % PIXELS:
            raise BadRequest(400, f"a raw body holds N x {PIXELS} uint8 pixels (N 28x28 images), got {len(body)} bytes")
        return np.frombuffer(body, np.uint8).reshape(-1, PIXELS)
    raise BadRequest(415, f"content type {content_type!r} is not accepted: send {TYPES}")


def answer(probs: np.ndarray, served: Served) -> bytes:
    """MLflow's answer to the classifier's table: {"predictions": [{digit, prob_0..prob_9, class}, ...]}."""
    digits = probs.argmax(1)
    rows = [
        {"digit": d, **dict(zip(PROBABILITIES, p, strict=True)), "class": c}
        for d, p, c in zip(digits.tolist(), probs.tolist(), served.classes[digits].tolist(), strict=True)
    ]
    return orjson.dumps({"predictions": rows})


def error(status: int, message: str, code: str = "BAD_REQUEST", **headers: str) -> Response:
    body = json.dumps({"error_code": code, "message": " ".join(message.split())})  # one line
    return Response(body, status, media_type="application/json", headers=headers or None)


class Server:
    """One worker's state: the model being served, the batcher, and the alias being followed."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.limits = BatchLimits(settings.max_images, settings.max_wait_ms / 1000)
        self.max_body = int(settings.max_body_mb * 2**20)
        self.served: Served | None = None
        self.batcher = Batcher(self.run, self.limits, expected=open_connections)
        self.watch = AliasWatch(settings.model)

    def run(self, x: torch.Tensor):
        return self.served.probabilities(x)  # read once per batch: the whole batch answers from one model

    async def read(self, request: Request) -> bytes:
        """The body, refused once it is known to pass the limit (413: by its Content-Length, or while streamed)
        or to arrive too slowly (408: not whole within body_timeout_s)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise BadRequest(413, f"the body is {int(declared):,} bytes, over the limit of {self.max_body:,}")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):  # the whole body: a trickle never resets it
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body:
                        raise BadRequest(413, f"the body passes the limit of {self.max_body:,} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            s = self.settings.body_timeout_s
            raise BadRequest(408, f"the body did not arrive within {s:g} s ({size:,} bytes came)") from None
        return b"".join(chunks)

    async def invocations(self, request: Request) -> Response:
        content_type = request.headers.get("content-type")
        try:
            # The body is read before any refusal but 413: a connection closed on unread bytes is reset, and
            # the client may then never see the answer.
            body = await self.read(request)
            if not content_type:  # MLflow answers 500 to this
                raise BadRequest(415, f"no Content-Type header: send {TYPES}")
            x = to_batch(from_body(body, content_type))  # (N, 1, 28, 28): the classifier's checks
        except BadRequest as e:
            headers = {"Connection": "close"} if e.status in (408, 413) else {}  # the rest of the body is not read
            return error(e.status, str(e), **headers)
        except MlflowException as e:  # to_batch's refusals: INVALID_PARAMETER_VALUE, 400
            return error(e.get_http_status_code(), e.message, e.error_code)
        except ClientDisconnect:  # gone mid-body: nothing was computed, nobody to answer
            return Response(status_code=499)
        probs, served = await self.batcher.submit(x)
        return Response(answer(probs, served), media_type="application/json", headers={VERSION_HEADER: served.version})

    async def follow(self) -> None:
        """Poll the alias every poll_s; load a new version beside the current one, then switch to it."""
        while True:
            await asyncio.sleep(self.settings.poll_s)
            version = await asyncio.to_thread(self.watch.version)
            if version is None or version == self.served.version:
                continue
            try:
                served = await asyncio.to_thread(load, self.settings.model, self.limits.max_images)
            except Exception as e:  # the old one keeps serving; tried again at the next poll
                keeps = self.served.version
                log.warning("loading version %s failed, version %s keeps serving: %s", version, keeps, one_line(e))
                continue
            old, self.served = self.served, served  # requests in flight finish on the batch they are in
            log.info("alias moved: %s now answers (was version %s)", served.uri, old.version)
            del old
            freeze(again=True)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.served = await asyncio.to_thread(load, self.settings.model, self.limits.max_images)
        s = self.settings
        log.info(
            "serving %s (from %s) in %s, %d torch thread(s) (%d cores / %d worker(s)); batches of up to %d images, "
            "waiting up to %g ms; bodies up to %g MB, whole within %g s; heads whole within %g s; %s; %s's event loop",
            self.served.uri, s.model, self.served.inference.describe(), torch.get_num_threads(), cores(), s.workers,
            s.max_images, s.max_wait_ms, s.max_body_mb, s.body_timeout_s, s.head_timeout_s,
            f"the alias is read every {s.poll_s:g} s" if self.watch.active and s.poll_s else "no alias followed",
            type(asyncio.get_running_loop()).__module__.split(".")[0],  # uvloop or asyncio
        )  # fmt: skip
        freeze()
        self.batcher.start()
        follower = asyncio.create_task(self.follow()) if self.watch.active and s.poll_s else None
        yield
        if follower:
            follower.cancel()
        await self.batcher.stop()


def freeze(again: bool = False) -> None:
    """Keep the loaded worker's objects (torch, MLflow, pandas, the model: about 430,000) out of the garbage
    collector's full passes. A request of 64 JSON images makes about 1,900 lists, so under load full passes kept
    coming, each holding the worker 0.2 s (0.6 s on a busy core): the JSON p99 of batch 64. Frozen, a full pass
    sees only what was made since. After the alias moves, one full pass of that length frees the old model."""
    if again:  # the previous model's objects leave the frozen set, so that its cycles can be freed
        gc.unfreeze()
    gc.collect()  # garbage now is not frozen with the rest
    gc.freeze()


async def ping(request: Request) -> Response:
    return Response("\n", media_type="application/json")  # as MLflow: up once the model is loaded


async def version(request: Request) -> Response:
    return Response(VERSION, media_type="application/json")  # MLflow's version, as MLflow answers


def create_app(settings: ServeSettings) -> Starlette:
    """The ASGI app of one worker: threads divided first, the model loaded at startup."""
    if not os.environ.get("OMP_NUM_THREADS"):  # an explicit setting wins, as for `mlflow models serve`
        torch.set_num_threads(max(1, cores() // settings.workers))
    server = Server(settings)
    routes = [
        Route("/invocations", server.invocations, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=server.lifespan)


def app_from_env() -> Starlette:
    """uvicorn's factory in each worker process: the settings from $PIPELINE_SERVE_SETTINGS."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return create_app(ServeSettings.from_env())
