"""Following the registry's alias: which version it points at, read again and again. MLflow only: the command's
own process uses it too, before any worker loads torch."""

from __future__ import annotations

import logging
import re

import mlflow
from mlflow import MlflowClient

from pipeline.common.errors import redact

log = logging.getLogger("pipeline.serving.champion")

ALIASED = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)")


def resolve(uri: str) -> tuple[str, str]:
    """(the URI of one fixed model, its version): `models:/name@alias` -> `models:/name/<version>`."""
    if m := ALIASED.fullmatch(uri):
        version = MlflowClient().get_model_version_by_alias(m["name"], m["alias"]).version
        return f"models:/{m['name']}/{version}", str(version)
    if m := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
        return uri, m[2]
    return uri, uri


class AliasWatch:
    """Reads the version an alias points at; one log line when the registry cannot be read, one when it can again."""

    def __init__(self, uri: str) -> None:
        m = ALIASED.fullmatch(uri)
        self.name, self.alias = (m["name"], m["alias"]) if m else (None, None)
        self.unreachable = False

    @property
    def active(self) -> bool:
        return self.name is not None

    def version(self) -> str | None:
        """The alias's version now; None when the registry cannot be read (the current model keeps serving)."""
        try:
            version = str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except Exception as e:  # unreachable, 5xx, the alias deleted: keep serving what we have
            if not self.unreachable:
                where = redact(mlflow.get_registry_uri())
                log.warning("registry at %s unreadable, the current model keeps serving: %s", where, one_line(e))
            self.unreachable = True
            return None
        if self.unreachable:
            log.info("registry readable again")
        self.unreachable = False
        return version


def one_line(e: BaseException) -> str:
    """An exception's message, first line only, shortened."""
    text = str(getattr(e, "message", None) or e).strip().splitlines()
    return redact(text[0][:300]) if text else type(e).__name__
