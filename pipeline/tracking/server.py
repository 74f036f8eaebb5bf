"""A tracking server's health: probe it once, bound MLflow's retries, turn its failures into one line."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.common.errors import PipelineError

# MLflow's own defaults retry a failed request 7 times with exponential backoff and wait 120 s
# for each answer: minutes of silence when the server dies mid-run. Fewer, shorter tries turn
# that into an error in seconds; values the user exported still win (setdefault).
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",  # per request; a model upload on a slow link needs some
}


PROBE_TIMEOUT = 5.0  # seconds; a healthy server answers one search in milliseconds
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"


RETRY_CODES = (429, 500, 502, 503, 504)  # what MLflow's client retries too


def _reason(error: Exception, timeout: float) -> str:
    """The short cause of a failed request; MLflow's own message is a long urllib3 chain."""
    text = str(error)
    known = {
        "Timeout": f"no answer within {timeout:g} s",
        "NewConnectionError": "connection refused (is the server running, is the port right?)",
        "NameResolutionError": "unknown host name",
        "SSLError": "TLS handshake failed",
        "Connection broken": "the connection broke mid-request",
        "RemoteDisconnected": "the server closed the connection",
    }
    for marker, reason in known.items():
        if marker in text:
            return reason
    if status := re.search(r"too many (\d{3}) error responses", text):  # MLflow's retries used up
        return f"HTTP {status[1]} after {1 + int(os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'])} tries"
    return text.splitlines()[0][:200] if text else type(error).__name__


def check_tracking_server(uri: str | None = None, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail within `timeout` seconds, naming the URI, if an http(s) tracking server is down or wrong."""
    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return  # local stores (sqlite, a folder) fail at once on their own
    for name, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line at the end, not each retry

    def probe(retries: int):
        # The user's credentials (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN) come from the env.
        return http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=retries,
            backoff_factor=float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
            timeout=timeout,
            params={"max_results": 1},
            raise_on_status=False,
        )

    try:
        response = probe(retries=0)  # nobody there: say so at once
        if response.status_code in RETRY_CODES:  # there, but busy or failing: MLflow's bounded retries
            response = probe(retries=int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
    except Exception as e:  # refused, timed out, unknown host, TLS: MLflow wraps them all
        raise PipelineError(f"MLflow tracking server {uri} is unreachable: {_reason(e, timeout)}") from e
    if response.status_code in RETRY_CODES:
        tries = 1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
        raise PipelineError(f"MLflow tracking server {uri} answers HTTP {response.status_code} ({tries} tries)")
    if response.status_code in (401, 403):
        raise PipelineError(
            f"MLflow tracking server {uri} refused the credentials (HTTP {response.status_code}); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    try:
        ok = response.status_code == 200 and isinstance(response.json(), dict)
    except ValueError:  # an HTML page: some other web server answers at this address
        ok = False
    if not ok:
        raise PipelineError(
            f"{uri} does not answer as an MLflow tracking server "
            f"(GET {PROBE_ENDPOINT} gave HTTP {response.status_code}); check MLFLOW_TRACKING_URI"
        )


@contextmanager
def answering(kept: str) -> Iterator[None]:
    """Turn a tracking server that stops answering (down, or errors after MLflow's bounded retries)
    into one line naming it and saying what is `kept`, instead of MLflow's traceback."""
    try:
        yield
    except MlflowException as e:
        uri = mlflow.get_tracking_uri()
        if urlparse(uri).scheme not in ("http", "https"):
            raise
        timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]))
        raise PipelineError(f"MLflow tracking server {uri} stopped answering ({_reason(e, timeout)}); {kept}") from e
