"""Credentials in a tracking URI (`https://user:token@host`): kept out of files, logs and errors.

MLflow takes them from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD as well, so `to_env`
moves them there and MLflow only ever sees the URI without them: then neither `models/mlflow_run.json`
(committed by git and DVC) nor MLflow's own messages can hold them. `redact` covers the rest.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://user[:password]@ anywhere in a text; the user alone may be a token too.
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^\s/@]+@")


def redact(text: str) -> str:
    """`text` with every URI's user and password replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)


def without_credentials(uri: str) -> str:
    """The URI without user and password."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def to_env(uri: str) -> str:
    """Move the URI's user and password to MLflow's variables; return the URI without them."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or (parts.username is None and parts.password is None):
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return without_credentials(uri)
