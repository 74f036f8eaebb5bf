"""pipeline.predict: image decoding, MNIST-style normalisation, the command line, model sources."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline import predict
from pipeline.errors import DataError
from pipeline.predict import ImageError, load_image, to_mnist

SEVEN = [(40, 30), (150, 30), (80, 170)]  # a "7" stroke, off-centre in a 320x240 picture


def draw_seven(path: Path, ink: tuple, paper: tuple, mode: str) -> Path:
    im = Image.new(mode, (320, 240), paper)
    ImageDraw.Draw(im).line(SEVEN, fill=ink, width=14)
    im.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """Both looks of a digit photo, bad files, and a blank picture."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    draw_seven(tmp_path / "full.png", 255, 0, "L")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:200])  # truncated PNG
    Image.new("L", (40, 40), 200).save(tmp_path / "blank.png")
    return {
        "dark_on_light": draw_seven(tmp_path / "scan.jpg", (25, 25, 30), (235, 230, 220), "RGB"),
        "light_on_dark": draw_seven(tmp_path / "mnist_like.png", 255, 0, "L"),
        "empty": tmp_path / "empty.png",
        "text": tmp_path / "text.png",
        "truncated": tmp_path / "cut.png",
        "blank": tmp_path / "blank.png",
        "missing": tmp_path / "missing.png",
    }


def centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    return float((ys * a).sum() / a.sum()), float((xs * a).sum() / a.sum())


def test_both_looks_normalise_to_the_same_mnist_digit(images) -> None:
    scan = to_mnist(load_image(images["dark_on_light"]))  # RGB JPEG, black on white
    mnist_like = to_mnist(load_image(images["light_on_dark"]))  # grayscale PNG, white on black
    for a in (scan, mnist_like):
        assert a.shape == (28, 28) and a.dtype == np.uint8
        assert a[0, 0] == a[0, -1] == a[-1, 0] == a[-1, -1] == 0  # black background, like MNIST
        rows, cols = np.nonzero(a)
        assert max(np.ptp(rows) + 1, np.ptp(cols) + 1) == 20  # bounding box fit in 20x20
        cy, cx = centre_of_mass(a.astype(float))
        assert abs(cy - 14) <= 1 and abs(cx - 14) <= 1  # centred by centre of mass
        assert a.max() > 180  # strokes stay bright after anti-aliased shrinking
    # The same drawing in either look gives (nearly) the same input: JPEG noise is all that differs.
    assert np.corrcoef(scan.ravel(), mnist_like.ravel())[0, 1] > 0.95


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty", "empty file"),
        ("text", "not an image"),
        ("truncated", "cannot read it"),
        ("missing", "cannot read it: No such file"),
    ],
)
def test_unreadable_files_raise_a_clear_image_error(images, name, message) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(images[name])


def test_a_blank_picture_has_no_digit(images) -> None:
    with pytest.raises(ImageError, match="no digit found"):
        to_mnist(load_image(images["blank"]))


def run_cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["predict", *argv])
    try:
        predict.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_checkpoint_is_a_pipeline_error(tmp_path) -> None:
    with pytest.raises(DataError, match="not found; run `dvc repro` first"):
        predict.load_predictor(str(tmp_path / "model.pt"))


@pytest.mark.slow
def test_cli_predicts_good_files_and_reports_each_bad_one(in_trained, images, monkeypatch, capsys) -> None:
    good = [str(images["dark_on_light"]), str(images["light_on_dark"])]
    code, out, err = run_cli(monkeypatch, capsys, *good)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == good
    assert all(line.split(": ")[1][0].isdigit() and line.endswith(")") for line in lines)

    files = [images["empty"], images["dark_on_light"], images["text"], images["blank"]]
    code, out, err = run_cli(monkeypatch, capsys, "--json", *map(str, files))
    assert code == 1  # something failed
    results = json.loads(out)
    assert [r["file"] for r in results] == list(map(str, files))
    assert results[0]["error"] == "empty file" and "not an image" in results[2]["error"]
    assert "no digit found" in results[3]["error"]
    ok = results[1]
    assert sum(ok["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert ok["digit"] == int(np.argmax(ok["probabilities"])) and ok["probability"] == max(ok["probabilities"])
    assert f"error: {files[0]}: empty file" in err and err.count("error: ") == 3

    # What the CLI printed is the checkpoint's own answer on the normalised image.
    net = predict.load_predictor("models/model.pt")
    probs = net(to_mnist(load_image(images["dark_on_light"]))[None])[0]
    assert np.allclose(probs, ok["probabilities"], atol=1e-5)


@pytest.mark.slow
def test_mlflow_uris_give_the_checkpoint_s_answers(in_trained, images) -> None:
    """models/model.pt, the run's pytorch `model` and the registered champion are the same network."""
    from .conftest import run_id_of

    paths = [images["dark_on_light"], images["light_on_dark"]]
    sources = ["models/model.pt", f"runs:/{run_id_of(in_trained)}/model", "models:/mnist-cnn@champion"]
    results = [predict.predict_files(paths, predict.load_predictor(s)) for s in sources]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a["digit"] == b["digit"]
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-5)
