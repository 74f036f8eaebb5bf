"""Credentials in URLs (`https://user:token@host`, `postgresql://user:password@host/db`,
`...?password=...`): kept out of files, logs and errors.

MLflow takes a tracking server's credentials from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD
as well, so `to_env` moves them there and MLflow only ever sees the URI without them: then neither
`models/mlflow_run.json` (committed by git and DVC) nor MLflow's own messages can hold them.
`redact` covers the rest: every message a stage prints or logs goes through it.

A URL is parsed, not matched word by word: `password=` and other secret query parameters are
masked first, then its user-info runs from `scheme://` to its last `@` (a host holds none), so a
password holding `/`, `@`, `:`, `?` or a space is hidden whole; a database URL's password is also
read by SQLAlchemy's own URL parser (what the driver will use). The URLs this process was given
(SWEEP_STORAGE, MLFLOW_TRACKING_URI, `--storage`: `remember`) are masked wherever they appear, and
so are their passwords.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, unquote

MASK = "***"
# scheme://[user-info@]: a scheme as RFC 3986 spells it.
_SCHEME = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://")
# In free text: user-info up to the last `@` before the next whitespace (a password's `/`, `:` or `@`
# included), or `user:pass word@host` with spaces (not `/`) in the password. It may hide more than
# the user-info of an odd text, never less.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:\S*@|[^\s@/:]*:[^@\n/]{0,100}?@(?=[\w\[]))")
# Query parameters that hold secrets, in any URL or text.
_SECRET_NAMES = r"(?:password|passwd|pwd|pass|token|access_token|secret|api_key|apikey|sslpassword)"
_SECRET_QUERY = re.compile(rf"(?i)([?&;]{_SECRET_NAMES}=)[^&;#\s]*")
_SECRET_QUERY_OF_URL = re.compile(rf"(?i)([?&;]{_SECRET_NAMES}=)[^&;#]*")  # one whole URL: spaces included
# The environment variables whose values are URLs or secrets of this process.
URL_VARS = ("SWEEP_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
SECRET_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
MIN_SECRET = 4  # shorter secrets are masked inside URLs only: replacing "ab" everywhere garbles text
_remembered: set[str] = set()


def split_userinfo(uri: str) -> tuple[str, str | None, str]:
    """(`scheme://`, user-info or None, the rest): the user-info runs to the last `@`, since a host
    holds none (call it after the secret query parameters are masked or dropped: they may hold one)."""
    match = _SCHEME.match(uri)
    if match is None:
        return "", None, uri
    rest = uri[match.end() :]
    at = rest.rfind("@")
    if at < 0:
        return match.group(0), None, rest
    return match.group(0), rest[:at], rest[at + 1 :]


def redact_url(uri: str) -> str:
    """One URL with its secret query parameters, then its user-info, replaced by `***`."""
    scheme, userinfo, rest = split_userinfo(_SECRET_QUERY_OF_URL.sub(rf"\1{MASK}", uri))
    return scheme + (f"{MASK}@" if userinfo is not None else "") + rest


def remember(uri: str | None) -> None:
    """Mask this URL (and its password) in every later message, wherever it appears."""
    if uri:
        _remembered.add(uri)


def secrets(uri: str) -> set[str]:
    """The user-info and password of a URL, as written and decoded, as we and SQLAlchemy read them."""
    found = set()
    _, userinfo, _ = split_userinfo(_SECRET_QUERY_OF_URL.sub("", uri))
    if userinfo:
        found |= {userinfo, userinfo.partition(":")[2]}
    for match in _SECRET_QUERY_OF_URL.finditer(uri):
        found.add(uri[match.end(1) : match.end()])
    if _SCHEME.match(uri) and not uri.startswith(("http://", "https://", "file:")):
        try:
            from sqlalchemy.engine import make_url  # what the database driver will be given

            found.add(make_url(uri).password or "")
        except Exception:  # not a database URL SQLAlchemy reads: our own reading above stands
            pass
    return {form for s in found if s for form in (s, unquote(s), quote(s, safe=""))}


def _known() -> tuple[list[str], list[str]]:
    """The URLs and the secrets of this process, longest first (a URL before its password)."""
    urls = {*_remembered, *(os.environ.get(v) for v in URL_VARS)} - {None, ""}
    found = {s for u in urls for s in secrets(u)} | {os.environ.get(v) or "" for v in SECRET_VARS}
    by_length = sorted(found, key=len, reverse=True)
    return sorted(urls, key=len, reverse=True), [s for s in by_length if len(s) >= MIN_SECRET]


def redact(text: str) -> str:
    """`text` with every URL's user-info and secret query parameters, and every known secret, as `***`."""
    urls, known = _known()
    for uri in urls:  # whole: a password with a space in it is no longer one word of the text
        text = text.replace(uri, redact_url(uri))
    for secret in known:
        text = text.replace(secret, MASK)
    return _USERINFO.sub(rf"\1{MASK}@", _SECRET_QUERY.sub(rf"\1{MASK}", text))


def without_credentials(uri: str) -> str:
    """The URI without user-info and without secret query parameters (for files)."""
    kept = _SECRET_QUERY_OF_URL.sub("", uri)
    if kept != uri and "?" not in kept:  # `?password=x&a=b` lost its `?`
        kept = kept.replace("&", "?", 1) if "&" in kept else kept
    scheme, userinfo, rest = split_userinfo(kept)
    return kept if userinfo is None else scheme + rest


def to_env(uri: str) -> str:
    """Move the URI's user and password to MLflow's variables; return the URI without them."""
    scheme, userinfo, _ = split_userinfo(_SECRET_QUERY_OF_URL.sub("", uri))
    if scheme.lower() not in ("http://", "https://") or userinfo is None:
        return uri
    user, colon, password = userinfo.partition(":")
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if colon:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return without_credentials(uri)
