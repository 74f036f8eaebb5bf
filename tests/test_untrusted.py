"""Untrusted inputs: credentials in every form through every message path; files from teammates."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from pipeline.common import credentials, errors
from pipeline.common.errors import PipelineError
from pipeline.sweep import study as studies

from .conftest import REPO

# Each form of URL a user may give, and the secrets it holds (as written and as the driver reads them).
FORMS = [
    ("postgresql+psycopg2://optuna:s3cr/et@127.0.0.1:1/sweeps", ["s3cr/et"]),
    ("postgresql://optuna:pa ss word@127.0.0.1:1/sweeps", ["pa ss word"]),
    ("postgresql://optuna@127.0.0.1:1/sweeps?sslmode=disable&password=hunter22", ["hunter22"]),
    ("postgresql://optuna:p%2Fss%20w@127.0.0.1:1/sweeps", ["p%2Fss%20w", "p/ss w"]),
    ("mysql+pymysql://optuna:p@ss:w0rd@127.0.0.1:1/sweeps", ["p@ss:w0rd", "ss:w0rd"]),
    ("https://alice:t0k/en99@mlflow.example/", ["t0k/en99", "alice"]),
    ("https://tokenonly12345@mlflow.example/", ["tokenonly12345"]),
    ("http://mlflow.example:5000/?token=abcd1234", ["abcd1234"]),
    ("https://bob:se cret9@mlflow.example:443/x?password=qwerty99", ["se cret9", "qwerty99"]),
]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.mark.parametrize(("url", "secrets"), FORMS)
def test_no_form_of_a_url_leaks_its_secret_through_any_message_path(url, secrets, monkeypatch) -> None:
    monkeypatch.setattr(credentials, "_remembered", set())
    for var in (*credentials.URL_VARS, *credentials.SECRET_VARS):
        monkeypatch.delenv(var, raising=False)
    texts = {
        "an error naming the URL": credentials.redact(f"cannot reach {url}: connection refused"),
        "the URL alone": credentials.redact_url(url),
        "a file (mlflow_run.json)": credentials.without_credentials(url),
        "an MLflow tag (sweep.failure)": studies.one_line(RuntimeError(f"lost {url}\nmore")),
    }
    record = errors._redacting(logging.LogRecord)(
        "pipeline.sweep", logging.INFO, __file__, 1, "study at %s", (url,), None
    )
    texts["a log line"] = record.getMessage()
    if url.startswith(("postgresql", "mysql")):
        with pytest.raises(PipelineError) as e:
            studies.storage(url, heartbeat=10)  # nothing listens on port 1; mysql: no driver
        texts["the storage error"] = str(e.value)
    else:
        monkeypatch.setattr(os, "environ", dict(os.environ))  # to_env writes MLflow's variables
        assert credentials.split_userinfo(credentials.to_env(url))[1] is None  # user:password went to the env
    for where, text in texts.items():
        assert not leaks(text, secrets), f"{where}: {text}"
    assert "127.0.0.1" in texts["the URL alone"] or "mlflow.example" in texts["the URL alone"]  # the host stays


def test_to_env_reads_a_password_with_a_slash_and_a_space(monkeypatch) -> None:
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert credentials.to_env("https://al%20ice:pa/ss w%40rd@host:5000/path") == "https://host:5000/path"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("al ice", "pa/ss w@rd")


def test_a_remembered_url_is_masked_anywhere_with_its_password(monkeypatch) -> None:
    monkeypatch.setattr(credentials, "_remembered", set())
    credentials.remember("postgresql://u:pa ss word@db/x")
    text = credentials.redact('FATAL: password "pa ss word" for postgresql://u:pa ss word@db/x refused')
    assert "pa ss" not in text and "postgresql://***@db/x" in text


def test_the_sweep_command_prints_the_storage_error_without_the_password() -> None:
    url = "postgresql+psycopg2://optuna:pa ss/w0rd@127.0.0.1:1/sweeps?password=hunter22"
    env = {**os.environ, "SWEEP_STORAGE": url, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "show", "fast-search"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1 and run.stderr.startswith("error: cannot open the study storage"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not leaks(run.stderr, ["pa ss", "w0rd", "hunter22"])
