"""pipeline.predict: image decoding, MNIST-style normalisation, the command line, model sources."""

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageOps

from pipeline import predict
from pipeline.common.errors import DataError
from pipeline.predict import ImageError, from_16_bit, load_image, to_mnist

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


FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def test_a_fashion_model_gets_pictures_in_fashion_mnist_s_look() -> None:
    """Objects keep their shape and shading: trimmed, the longer side to 28, centred; no thresholding."""
    photo = np.full((60, 100), 250, dtype=np.uint8)  # a product photo on white
    photo[10:50, 30:50] = 80  # a dark 40x20 garment...
    photo[10:50, 30:35] = 160  # ...with a lighter seam, which MNIST's 32-level noise floor would keep only as ink
    shaped = predict.to_object(photo)
    assert shaped.shape == (28, 28)
    assert shaped[:, :7].max() == 0 and shaped[:, -7:].max() == 0  # 28 tall, 14 wide, centred
    assert (shaped[:, 7:21] > 0).all()  # the whole garment is there, not just its strongest pixels
    assert shaped[14, 15] == 175 and 90 <= shaped[14, 8] <= 100  # the two shades, negated, kept apart
    assert np.array_equal(predict.to_object(255 - photo), shaped)  # a light object on black: the same
    assert predict.look_of(FASHION) is predict.to_object
    assert predict.look_of(predict.DIGITS) is to_mnist
    assert predict.look_of(FASHION, "digit") is to_mnist


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty", "empty file"),
        ("text", "not a PNG, JPEG or GIF image"),
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
    assert results[0]["error"] == "empty file" and "not a PNG, JPEG or GIF image" in results[2]["error"]
    assert "no digit found" in results[3]["error"]
    ok = results[1]
    assert sum(ok["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert ok["digit"] == int(np.argmax(ok["probabilities"])) and ok["probability"] == max(ok["probabilities"])
    assert f"error: {files[0]}: empty file" in err and err.count("error: ") == 3

    # What the CLI printed is the checkpoint's own answer on the normalised image.
    net, classes = predict.load_predictor("models/model.pt")
    assert classes == tuple("0123456789") and ok["class"] == str(ok["digit"])
    probs = net(to_mnist(load_image(images["dark_on_light"]))[None])[0]
    assert np.allclose(probs, ok["probabilities"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-5), ("bf16", 1e-2)])
def test_mlflow_uris_give_the_checkpoint_s_answers(in_trained, images, monkeypatch, precision, atol) -> None:
    """models/model.pt, the run's pytorch `model` and the registered champion are the same network.
    The checkpoint and the champion run in INFERENCE_PRECISION, the logged pt2 `model` in fp32
    always: equal to 1e-5 in fp32; in bf16 (8 bits of mantissa) to 1e-2, on any CPU."""
    from .helpers.tracking import run_id_of

    monkeypatch.setenv("INFERENCE_PRECISION", precision)
    paths = [images["dark_on_light"], images["light_on_dark"]]
    sources = ["models/model.pt", f"runs:/{run_id_of(in_trained)}/model", "models:/mnist-cnn@champion"]
    results = [predict.predict_files(paths, *predict.load_predictor(s)) for s in sources]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a["digit"] == b["digit"] and a["class"] == b["class"]
            assert np.allclose(a["probabilities"], b["probabilities"], atol=atol)


def declared_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (CRC fixed): a decompression bomb as Pillow sees it."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, after the 8-byte signature
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of b"IHDR" + its 13 bytes
    return bytes(data)


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Path]:
    """Files that broke or could break predict, made with Pillow; `reference` is the plain picture."""
    ink, paper = (78, 78, 78), (234, 234, 234)  # a gray scan: mid-tones that 16 bits must keep
    plain = draw_seven(tmp_path / "reference.png", ink, paper, "RGB")
    gray = np.asarray(Image.open(plain).convert("L"))
    files = {"reference": plain}

    files["16-bit PNG"] = tmp_path / "deep.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(files["16-bit PNG"])  # mode I;16, 0-65535

    files["CMYK JPEG"] = tmp_path / "print.jpg"
    cmyk = Image.new("CMYK", (320, 240), (0, 0, 0, 255 - paper[0]))
    ImageDraw.Draw(cmyk).line(SEVEN, fill=(0, 0, 0, 255 - ink[0]), width=14)
    cmyk.save(files["CMYK JPEG"], quality=95)

    # A phone photo: the sensor's landscape pixels, stored turned, with EXIF Orientation 6
    # ("rotate 90 degrees clockwise to view"); bigger than MAX_SIDE, so it is shrunk too.
    files["EXIF-rotated photo"] = tmp_path / "IMG_0001.jpg"
    photo = Image.open(plain).resize((1600, 1200)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(files["EXIF-rotated photo"], exif=exif, quality=90)

    files["animated GIF"] = tmp_path / "anim.gif"
    frames = [Image.open(plain).convert("L"), Image.new("L", (320, 240), 0)]  # the digit, then black
    frames[0].save(files["animated GIF"], save_all=True, append_images=frames[1:], duration=100, loop=0)

    files["JPEG named .png"] = tmp_path / "photo.png"
    Image.open(plain).save(files["JPEG named .png"], format="JPEG")

    files["text named .png"] = tmp_path / "notes.png"
    files["text named .png"].write_text("<html>not a picture</html>\n")
    files["truncated PNG"] = tmp_path / "cut.png"
    files["truncated PNG"].write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    files["bomb 30000x30000"] = tmp_path / "bomb.png"
    files["bomb 30000x30000"].write_bytes(declared_png(30000, 30000))
    files["bomb 9500x9500"] = tmp_path / "big.png"  # over MAX_IMAGE_PIXELS, where Pillow only warns
    files["bomb 9500x9500"].write_bytes(declared_png(9500, 9500))
    return files


READABLE = ["16-bit PNG", "CMYK JPEG", "EXIF-rotated photo", "animated GIF", "JPEG named .png"]
REFUSED = {
    "text named .png": "not a PNG, JPEG or GIF image",
    "truncated PNG": "cannot read it: image file is truncated",
    "bomb 30000x30000": r"Image size \(900000000 pixels\) exceeds limit",
    "bomb 9500x9500": r"Image size \(90250000 pixels\) exceeds limit",
}


@pytest.mark.parametrize("name", READABLE)
def test_odd_but_valid_images_normalise_like_the_plain_picture(hostile, name) -> None:
    reference = to_mnist(load_image(hostile["reference"])).astype(float)
    got = to_mnist(load_image(hostile[name])).astype(float)
    assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.95  # JPEG noise is all that differs


@pytest.mark.parametrize("name", REFUSED)
def test_broken_images_are_refused_in_one_line_before_decoding(hostile, name) -> None:
    with pytest.raises(ImageError, match=REFUSED[name]) as e:
        load_image(hostile[name])
    assert "\n" not in str(e.value)


def test_16_bit_pixels_are_scaled_not_clipped() -> None:
    assert from_16_bit(np.array([0, 257, 32896, 65535], np.uint16)).tolist() == [0, 1, 128, 255]
    with pytest.raises(ImageError, match="not 8- or 16-bit"):
        from_16_bit(np.array([0, 70000], np.int32))


@pytest.mark.slow
def test_cli_on_hostile_files_answers_each_in_one_line(in_trained, hostile, monkeypatch, capsys) -> None:
    names = [n for n in hostile if n != "reference"]
    code, out, err = run_cli(
        monkeypatch, capsys, "--json", str(hostile["reference"]), *(str(hostile[n]) for n in names)
    )
    results = json.loads(out)
    assert code == 1 and "Traceback" not in err
    assert "digit" in results[0]  # the plain picture, first in the same call
    by_name = dict(zip(names, results[1:], strict=True))
    # Each readable file is predicted (that its input matches the plain picture's is tested above).
    for name in READABLE:
        result = by_name[name]
        assert result["digit"] == int(np.argmax(result["probabilities"])), name
        assert sum(result["probabilities"]) == pytest.approx(1, abs=1e-4), name
    for name, message in REFUSED.items():
        assert re.search(message, by_name[name]["error"]), by_name[name]
    assert err.splitlines() == [f"error: {hostile[n]}: {by_name[n]['error']}" for n in names if n in REFUSED]


def test_only_the_listed_formats_are_opened_and_eps_never_reaches_ghostscript(tmp_path, monkeypatch) -> None:
    from PIL import EpsImagePlugin

    eps = tmp_path / "digit.png"  # an EPS file named like a PNG
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 0 moveto 28 28 lineto stroke\n%%EOF\n")
    with Image.open(eps) as im:  # Pillow takes it when asked for any format: loading it runs Ghostscript
        assert im.format == "EPS"

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was invoked")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    with pytest.raises(ImageError, match="^not a PNG, JPEG or GIF image$"):
        load_image(eps)
    bmp = tmp_path / "digit.bmp"
    Image.new("L", (28, 28)).save(bmp)
    with pytest.raises(ImageError, match="not a PNG, JPEG or GIF image"):
        load_image(bmp)


def test_an_oversized_png_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(declared_png(9500, 9500))  # a real PNG header: 90 million pixels declared
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or Image.Image.load(self))
    with pytest.raises(ImageError, match=r"Image size \(90250000 pixels\) exceeds limit"):
        load_image(big)
    assert decoded == []


def test_a_big_picture_is_shrunk_before_any_copy(tmp_path, monkeypatch) -> None:
    """A 3000x2000 RGBA PNG: rotation, alpha and gray are done on the 1024-pixel copy, never full size."""
    path = tmp_path / "big.png"
    im = Image.new("RGBA", (3000, 2000), (255, 255, 255, 0))
    ImageDraw.Draw(im).line([(400, 300), (2000, 300), (900, 1800)], fill=(0, 0, 0, 255), width=150)
    im.save(path)
    sizes = []  # of every image that predict rotates, lays on white or scales from 16 bits
    for module, name in [(ImageOps, "exif_transpose"), (Image, "alpha_composite"), (predict, "from_16_bit")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original: sizes.append(np.shape(a[-1])) or _f(*a))
    gray = load_image(path)
    assert gray.shape == (683, 1024) and sizes == [(683, 1024, 4), (683, 1024, 4)]
    assert to_mnist(gray).max() > 180  # the digit survived
