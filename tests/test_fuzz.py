"""Property-based fuzzing of every parser of outside data: a correct result or our own one-line
error, never another exception, a hang or a crash.

The suite runs the short profile (a few seconds in all); the long one by a command:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import params as params_module
from pipeline import recipe
from pipeline.common import credentials
from pipeline.common.errors import DataError, ParamsError
from pipeline.data.datasets import FILE_NAME, read_info
from pipeline.data.idx import IMAGE_MAGIC, LABEL_MAGIC, read_idx
from pipeline.predict import ImageError, load_image
from pipeline.sweep.spec import Sweep, load_sweep

from .helpers.repo import REPO

# No example database: nothing written into the repository; a failure prints its example to reproduce.
common = {"database": None, "deadline": timedelta(seconds=5), "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("short", max_examples=25, **common)
settings.register_profile("long", max_examples=2000, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "short"))

# JSON- and YAML-like values: what a file written by anyone may hold.
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A scratch folder with the repository's params.yaml and recipes, as a working directory."""
    work = tmp_path_factory.mktemp("fuzz")
    (work / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (work / "recipes").mkdir()
    (work / "recipes" / "fast.yaml").write_text((REPO / "recipes" / "fast.yaml").read_text())
    (work / "sweeps").mkdir()
    return work


@st.composite
def idx_files(draw) -> bytes:
    """Mostly near-valid IDX files (a real magic, small dims, a body near the right size), some noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=64))
    images = draw(st.booleans())
    magic = draw(st.sampled_from([IMAGE_MAGIC, LABEL_MAGIC, 0, 2052, -1]))
    dims = draw(st.lists(st.integers(-3, 30), min_size=3 if images else 1, max_size=3 if images else 1))
    size = int(np.prod([max(d, 0) for d in dims]))
    body = draw(st.integers(max(0, size - 3), size + 3))
    return struct.pack(f">{1 + len(dims)}i", magic, *dims) + bytes(body)


@given(data=idx_files(), images=st.booleans())
def test_idx_files(tmp_path_factory, data, images) -> None:
    path = tmp_path_factory.mktemp("idx") / "x"
    path.write_bytes(data)
    try:
        array = read_idx(path, images=images)
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert array.dtype == np.uint8 and len(array) >= 1 and array.shape[1:] == ((28, 28) if images else ())


@given(data=values | st.fixed_dictionaries({"name": values, "classes": values, "files": values}))
def test_dataset_json(tmp_path_factory, data) -> None:
    folder = tmp_path_factory.mktemp("info")
    (folder / "dataset.json").write_text(json.dumps(data))
    try:
        info = read_info(folder, "download")
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert len(info.files) == 4 and all(FILE_NAME.fullmatch(f) and "/" not in f for f in info.files)
    assert info.classes and all(isinstance(c, str) and c.isprintable() for c in info.classes)


KEYS = ["train.lr", "train.epochs", "train.batch_size", "model.nf", "model.arch", "train.device", "x.y", "train"]
dimension = st.fixed_dictionaries(
    {"type": st.sampled_from(["float", "int", "categorical", "normal"])},
    optional={"low": scalars, "high": scalars, "log": scalars, "step": scalars, "choices": values, "extra": scalars},
)
sweep_files = st.fixed_dictionaries(
    {"params": st.dictionaries(st.sampled_from(KEYS), dimension, max_size=3) | values},
    optional={
        "trials": scalars,
        "objective": st.sampled_from(["val_accuracy", "val_loss", "test_accuracy"]) | scalars,
        "recipe": st.sampled_from(["fast", "../fast", "none"]) | scalars,
        "fixed": st.dictionaries(st.sampled_from(KEYS), scalars, max_size=2) | values,
        "sampler": st.fixed_dictionaries(
            {"name": st.sampled_from(["tpe", "random", "grid", "x"])},
            optional={"seed": scalars, "n_startup_trials": scalars, "gamma": scalars},
        )
        | values,  # fmt: skip
        "pruner": st.fixed_dictionaries(
            {"name": st.sampled_from(["median", "percentile", "hyperband", "none"])},
            optional={"percentile": scalars, "n_warmup_steps": scalars, "min_resource": scalars},
        )
        | values,  # fmt: skip
        "heartbeat": scalars,
        "max_failures": scalars,
        "budget": scalars,
    },
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=sweep_files | values)
def test_sweep_files(folder, monkeypatch, raw) -> None:
    monkeypatch.chdir(folder)
    (folder / "sweeps" / "fuzz.yaml").write_text(yaml.safe_dump(raw))
    try:
        sweep = load_sweep("fuzz")
    except ParamsError as e:
        assert "\n" not in str(e).strip()
        return
    assert isinstance(sweep, Sweep) and sweep.trials >= 1 and sweep.params


recipe_files = st.dictionaries(
    st.sampled_from(["model", "train", "evaluate", "x"]),
    st.dictionaries(
        st.sampled_from(["arch", "nf", "lr", "betas", "device", "schedule", "epochs", "x"]), values, max_size=3
    )
    | values,
    max_size=2,
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=recipe_files | values, name=st.sampled_from(["fuzz", "../fuzz", ".fuzz"]))
def test_recipe_files(folder, monkeypatch, raw, name) -> None:
    monkeypatch.chdir(folder)
    (folder / "recipes" / "fuzz.yaml").write_text(yaml.safe_dump(raw))
    try:
        loaded = recipe.load_recipe(name)
        flags = recipe.shell_flags(loaded)
    except ParamsError as e:
        assert "\n" not in str(e).strip()
        return
    assert all(recipe.SAFE_WORD.fullmatch(f) for f in flags[1::2])  # nothing a shell splits or expands


SECTIONS = {
    "download": params_module.DownloadConfig,
    "preprocess": params_module.PreprocessConfig,
    "model": params_module.ModelConfig,
    "train": params_module.TrainConfig,
    "evaluate": params_module.EvaluateConfig,
    "mlflow": params_module.MlflowConfig,
    "register": params_module.RegisterConfig,
}


@st.composite
def sections(draw) -> tuple[str, dict]:
    """A params.yaml section: the repository's own, some keys replaced by anything."""
    name = draw(st.sampled_from(sorted(SECTIONS)))
    section = dict(yaml.safe_load((REPO / "params.yaml").read_text())[name])
    fields = [f.name for f in dataclasses.fields(SECTIONS[name])]
    for key in draw(st.lists(st.sampled_from([*fields, "unknown"]), max_size=2)):
        section[key] = draw(values)
    return name, section


@given(section=sections())
def test_params_sections(section) -> None:
    name, raw = section
    try:
        config = params_module.parse_section(name, SECTIONS[name], raw, Path("params.yaml"))
    except ParamsError as e:
        assert "\n" not in str(e).strip()
        return
    assert isinstance(config, SECTIONS[name])


@st.composite
def pictures(draw) -> bytes:
    """Real PNG, JPEG, GIF and BMP files with bytes flipped or cut, and noise."""
    kind = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "noise"]))
    if kind == "noise":
        return draw(st.binary(max_size=200))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1"] if kind != "JPEG" else ["L", "RGB"]))
    buffer = io.BytesIO()
    Image.new(mode, size, draw(st.integers(0, 255)) if mode in ("L", "P", "1") else (9, 99, 199)).save(buffer, kind)
    data = bytearray(buffer.getvalue())
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


@given(data=pictures())
def test_predict_image_bytes(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("img") / "picture.png"
    path.write_bytes(data)
    try:
        pixels = load_image(path)
    except ImageError as e:
        assert "\n" not in str(e)
        return
    assert data[:2] != b"BM"  # BMP is never opened, whatever the file's name
    assert pixels.ndim == 2 and pixels.dtype == np.float32 and 0 <= pixels.min() <= pixels.max() <= 255


secret_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=4, max_size=16)


@given(
    scheme=st.sampled_from(["postgresql", "postgresql+psycopg2", "mysql", "https", "http"]),
    user=st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="@:/"), max_size=8),
    password=secret_text,
    spaced=st.text(" ab/", max_size=3),
    query=st.booleans(),
)
def test_redaction_of_urls(scheme, user, password, spaced, query) -> None:
    """Any printable password (with `/`, `@`, `:`, `?`) is hidden in free text; one with spaces too
    once the URL is known (remembered, or in SWEEP_STORAGE / MLFLOW_TRACKING_URI)."""
    host = "db.example:5432/sweeps"
    url = f"{scheme}://{user}:{password}@{host}" if not query else f"{scheme}://{host}?password={password}"
    assume(password not in f"{scheme}://{user}:@{host}?password= said: at " and "&" not in password)
    assume(not query or not set(password) & set("#;"))  # they end a query parameter
    text = f"error at {url} said: no"
    assert password not in credentials.redact(text)
    assert password not in credentials.redact_url(url) and password not in credentials.without_credentials(url)
    if spaced.strip():  # a password with a space: hidden once the URL is known
        spaced_url = url.replace(password, password[:2] + spaced + password[2:])
        secret = password[:2] + spaced + password[2:]
        saved = set(credentials._remembered)
        credentials.remember(spaced_url)
        try:
            assert secret not in credentials.redact(f"error at {spaced_url} said: {secret}")
        finally:
            credentials._remembered.clear()
            credentials._remembered.update(saved)


batches = (
    hnp.arrays(
        st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.bool_, np.complex64, np.dtype("U3"), object]),
        st.sampled_from([(1, 28, 28), (2, 784), (1, 1, 28, 28), (0, 784), (3,), (2, 27, 28), (1, 784, 1), ()]),
        elements=None,
    )
    | st.lists(st.lists(scalars, min_size=784, max_size=784), min_size=1, max_size=2)
    | values
)


@given(batch=batches | st.builds(lambda a: pd.DataFrame(a.reshape(len(a), -1)), hnp.arrays(np.float64, (2, 784))))
def test_served_model_inputs(batch) -> None:
    """The served model's input check (pyfunc.to_batch, unchanged here): a (N, 1, 28, 28) float batch
    in [0, 255], or MLflow's INVALID_PARAMETER_VALUE (HTTP 400) with a one-line message."""
    from pipeline.serving.pyfunc import to_batch

    try:
        x = to_batch(batch)
    except MlflowException as e:
        assert e.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in e.message
        return
    assert tuple(x.shape[1:]) == (1, 28, 28) and len(x) >= 1 and 0 <= float(x.min()) <= float(x.max()) <= 255
