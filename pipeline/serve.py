"""Serve a registered model with dynamic batching: python -m pipeline.serve [--model URI] [--workers N] [--port P].

Beside `mlflow models serve` (same model, same answers, same JSON protocol), on Starlette and
uvicorn, which MLflow brings: see docs/using-the-model.md, "The batching server".
"""

from __future__ import annotations

import argparse
import functools
import logging

import uvicorn
from mlflow.exceptions import MlflowException

from pipeline.common.errors import PipelineError, run_stage
from pipeline.serving.champion import resolve
from pipeline.serving.connections import TimedHeadProtocol
from pipeline.serving.settings import ServeSettings

# Defaults measured with 8 clients, 2 workers on 2 shared cores (docs/performance.md, "The batching server"),
# in interleaved rounds against the earlier 64 images and no wait: waiting up to 1 ms for requests to join a
# call took server CPU per one-image request from 0.76-0.80 to 0.62-0.69 ms (the wait applies only while
# requests come together: a lone client waits for nobody); up to 256 images a call (a request's own cap, so
# no new worst case) took it from 16.5-17.7 to 12.2-14.0 ms per request of 64 images.
MAX_IMAGES = 256
MAX_WAIT_MS = 1.0
MAX_BODY_MB = 16.0  # 256 images as pretty-printed float JSON stay well under it
POLL_S = 10.0
# A body must arrive whole within this many seconds of its request's head, or the client gets 408 and the
# connection is closed. The largest request that makes sense, 256 images, is about 1 MB of JSON: 10 s let
# it come over a link of 1 Mbit/s. A client trickling its body holds a socket and a coroutine until then,
# not a worker: the others are served meanwhile (tests/test_serve.py).
BODY_TIMEOUT_S = 10.0
# A request's head (its request line and headers, well under a kilobyte here) must arrive whole within this many
# seconds of the connection's opening (first request) or of its first byte (the next ones), or the client gets
# 408 and the connection is closed: uvicorn itself times out only idle connections between requests.
HEAD_TIMEOUT_S = 10.0
# With several workers, a kept-alive connection is answered this many times, then closed (`connection: close`),
# so that the client reconnects to whichever worker accepts first and an uneven split of clients between workers
# (6 and 2 of 8 was seen) evens out. Measured against no limit, 8 clients on 2 workers (2 cores, bf16): one-image
# requests 1.08-1.57x the images/s in 4 rows of 4; batches of 64, 3 rounds of 8 s: 0.99-2.31x, p99/p50 2.2-2.7
# against 1.4-6.3 (a first run of 2 rounds of 5 s had them lower, in rounds that moved 2.3x): docs/performance.md,
# "The split of connections". nginx's `keepalive_requests` closes its own connections after 1,000 for this reason.
REQUESTS_PER_CONNECTION = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/mnist-cnn@champion", help="MLflow model URI of a classifier")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=2, help="processes; torch threads = cores / workers")
    parser.add_argument("--max-images", type=int, default=MAX_IMAGES, help="images per call of the network")
    parser.add_argument("--max-wait-ms", type=float, default=MAX_WAIT_MS, help="wait for requests to join a call")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_MB, help="larger bodies get 413 unread")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="seconds between reads of the alias (0: never)")
    parser.add_argument(
        "--body-timeout-s", type=float, default=BODY_TIMEOUT_S, help="for a body to arrive whole (else 408)"
    )
    parser.add_argument(
        "--head-timeout-s", type=float, default=HEAD_TIMEOUT_S, help="for a request's head to arrive whole (else 408)"
    )
    parser.add_argument(
        "--requests-per-connection",
        type=int,
        default=REQUESTS_PER_CONNECTION,
        help="with several workers, answers on a connection before it is closed, so clients spread (0: no limit)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:  # checked here, before any worker starts
        settings = ServeSettings(
            args.model, args.workers, args.max_images, args.max_wait_ms, args.max_body_mb, args.poll_s,
            args.body_timeout_s, args.head_timeout_s, args.requests_per_connection,
        )  # fmt: skip
    except ValueError as e:
        parser.error(str(e))
    try:
        fixed, _ = resolve(args.model)  # a missing model or alias: one line here, not a traceback per worker
    except MlflowException as e:
        raise PipelineError(f"cannot serve {args.model}: {e.message}") from None
    logging.getLogger("pipeline.serve").info("%s is %s; starting %d worker(s)", args.model, fixed, args.workers)
    settings.to_env()  # each worker process builds its app from it
    uvicorn.run(
        "pipeline.serving.server:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",  # no line per request; ours say what is served
        timeout_graceful_shutdown=10,
        http=functools.partial(  # httptools, timed, connections moved between workers
            TimedHeadProtocol,
            head_timeout_s=settings.head_timeout_s,
            requests_per_connection=settings.requests_per_connection if settings.workers > 1 else 0,
        ),
        access_log=False,  # the access log's arguments are built for every request even when it is not shown
    )


if __name__ == "__main__":
    run_stage(main)
