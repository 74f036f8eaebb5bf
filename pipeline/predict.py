"""Predict the class of image files: python -m pipeline.predict IMAGE... [--model PATH_OR_URI] [--json]."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.common.errors import DataError, PipelineError, run_stage
from pipeline.core.checkpoint import DIGITS, load_model
from pipeline.core.inference import prepare
from pipeline.data.datasets import IMAGE_SIZE

log = logging.getLogger("pipeline.predict")

BOX = 20  # MNIST scaled each digit's bounding box to fit 20x20, keeping its aspect ratio
NOISE = 32  # ink below this (of 255, after contrast stretch) is paper texture or JPEG noise
MIN_CONTRAST = 24  # darkest-to-brightest spread below this: no digit to see
TRIM = 0.05 * 255  # Fashion-MNIST's trimming: an edge within 5% of the background's intensity is background
MAX_SIDE = 1024  # bigger pictures are shrunk to this many pixels on their longer side before normalising
# The formats docs/using-the-model.md lists, and only those: Pillow knows dozens more (EPS goes to Ghostscript
# where it is installed), each a decoder that any file named .png could reach.
FORMATS = ("PNG", "JPEG", "GIF")
NOT_AN_IMAGE = "not a PNG, JPEG or GIF image"
URI = re.compile(r"^[a-z][a-z0-9+.-]+:/")  # runs:/, models:/, file://, s3://, ...

Predictor = Callable[[np.ndarray], np.ndarray]  # uint8 (N, 28, 28) -> probabilities (N, 10)


class ImageError(Exception):
    """One input file that cannot be used; reported for that file only."""


def load_image(path: Path) -> np.ndarray:
    """Decode a PNG, JPEG or GIF (any size; gray, RGB, CMYK, 16-bit or with alpha) to gray (H, W) in [0, 255]."""
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file")
        with warnings.catch_warnings():
            # Image.open reads the header only, and checks the declared size there: Pillow refuses
            # images over twice Image.MAX_IMAGE_PIXELS (89.5 million) as decompression bombs and only
            # warns between once and twice: refuse those too, before a pixel is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as im:
                if im.mode == "F":
                    raise ImageError("floating-point pixels are not supported (PNG, JPEG or GIF expected)")
                im.draft(im.mode, (MAX_SIDE, MAX_SIDE))  # JPEG only: decode big photos at 1/2, 1/4 or 1/8 size
                # Decode, and shrink at once in the file's own mode: every copy below (rotation, 16-bit
                # scaling, alpha, gray) is then of at most MAX_SIDE x MAX_SIDE pixels.
                im.thumbnail((MAX_SIDE, MAX_SIDE))
                im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
                if im.mode == "I" or im.mode.startswith("I;16"):
                    im = Image.fromarray(from_16_bit(np.asarray(im)))
                elif im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                    # Transparent means background: lay the image on white (a drawing app's canvas).
                    im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
                im = im.convert("L")  # an animated GIF: its first frame
                return np.asarray(im, dtype=np.float32)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(NOT_AN_IMAGE) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:  # missing, unreadable, truncated, corrupt
        raise ImageError(f"cannot read it: {getattr(e, 'strerror', None) or e}") from None
    except Exception as e:  # PIL's decoders raise other kinds too on corrupt data (EOFError, struct.error)
        raise ImageError(f"cannot read it: {type(e).__name__}: {e}") from None


def from_16_bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit gray (0-65535) to uint8 0-255, scaled: Pillow's convert("L") would clip everything above 255 to white."""
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ImageError(f"pixel values {pixels.min()} to {pixels.max()} are not 8- or 16-bit")
    return (pixels.astype(np.float32) * (255 / 65535)).round().astype(np.uint8)


def on_black(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The picture as light on dark, and its background's level (the border's median): a light
    background (a scan, a drawing, a product photo) is negated, as both datasets were made."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    return (255 - gray, 255 - background) if background > 127 else (gray, background)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """The MNIST look: white digit on black, bounding box fit in 20x20, centre of mass at the centre of 28x28."""
    gray, background = on_black(gray)
    ink = np.clip(gray - background, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise ImageError("no digit found: the image is (nearly) uniform")
    ink = ink * (255 / ink.max())  # strongest stroke -> 255, background -> 0
    ink[ink < NOISE] = 0
    rows, cols = np.nonzero(ink)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # the digit's bounding box
    scale = BOX / max(ink.shape)
    h, w = (max(1, round(n * scale)) for n in ink.shape)
    # PIL's BILINEAR widens its filter when shrinking: anti-aliased like MNIST, no ringing.
    digit = Image.fromarray(ink.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    digit = np.asarray(digit, dtype=np.float32)  # (h, w), longest side 20
    ys, xs = np.indices(digit.shape)
    total = digit.sum()
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    # Shift the centre of mass to the centre, as far as the 28x28 frame lets the whole box move.
    top = min(max(round(IMAGE_SIZE / 2 - cy), 0), IMAGE_SIZE - h)
    left = min(max(round(IMAGE_SIZE / 2 - cx), 0), IMAGE_SIZE - w)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    out[top : top + h, left : left + w] = digit.round().clip(0, 255)
    return out


def to_object(gray: np.ndarray) -> np.ndarray:
    """Fashion-MNIST's look (Zalando's own conversion): light object on black, the edges that are
    background trimmed, the longer side scaled to 28 and the shorter one centred; no thresholding."""
    gray, background = on_black(gray)  # a product photo on white: Fashion-MNIST negated those too
    content = np.abs(gray.astype(np.float32) - background) > TRIM
    if not content.any():
        raise ImageError("no object found: the image is (nearly) uniform")
    rows, cols = np.nonzero(content)
    item = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = IMAGE_SIZE / max(item.shape)
    h, w = (max(1, round(n * scale)) for n in item.shape)
    item = np.asarray(Image.fromarray(item.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    top, left = (IMAGE_SIZE - h) // 2, (IMAGE_SIZE - w) // 2
    out[top : top + h, left : left + w] = item
    return out


def look_of(classes: tuple[str, ...], look: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """How a picture is made to look like the training data: MNIST's digits when the model's classes
    are the ten digits, else Fashion-MNIST's objects (`look` = digit | object overrides)."""
    if look == "auto":
        look = "digit" if classes == DIGITS else "object"
    return to_mnist if look == "digit" else to_object


def load_predictor(spec: str) -> tuple[Predictor, tuple[str, ...]]:
    """A checkpoint path (models/model.pt) or an MLflow model URI, as images -> probabilities, and
    its class names."""
    if URI.match(spec):
        import mlflow  # only here: it takes seconds to import

        try:
            model = mlflow.pyfunc.load_model(spec)
        except mlflow.exceptions.MlflowException as e:
            raise PipelineError(f"cannot load MLflow model {spec}: {e.message}") from e
        # train logs both models with their class names; models logged before then were MNIST's.
        classes = (model.metadata.metadata or {}).get("classes", DIGITS)
        if not (isinstance(classes, list | tuple) and len(classes) == 10 and all(_name(c) for c in classes)):
            raise DataError(f"{spec}: its metadata's 'classes' must be 10 class names, got {str(classes)[:120]}")
        classes = tuple(classes)

        def predict(images: np.ndarray) -> np.ndarray:
            out = model.predict(images[:, None].astype(np.float32))  # both logged models take (N, 1, 28, 28)
            if hasattr(out, "columns"):  # the `classifier` serving model: digit, prob_0..prob_9, class
                return out[[f"prob_{k}" for k in range(10)]].to_numpy()
            return torch.softmax(torch.as_tensor(np.asarray(out)), dim=1).numpy()  # `model`: logits

        return predict, classes
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro` first, or pass --model with an MLflow model URI")
    try:
        net, classes = load_model(path)
    except Exception as e:
        raise DataError(f"{path} is not a model checkpoint ({type(e).__name__}: {e})") from e
    inference = prepare(net)  # as the served model: channels_last, bf16 where native ($INFERENCE_PRECISION)
    log.info("%s runs in %s", path, inference.describe())

    def predict(images: np.ndarray) -> np.ndarray:
        return inference.probabilities(torch.from_numpy(images[:, None])).numpy()  # (N, 10)

    return predict, classes


def _name(value: object) -> bool:
    """A class name as predict prints it: a short printable string."""
    return isinstance(value, str) and 0 < len(value) <= 100 and value.isprintable()


def predict_files(
    paths: list[Path], predictor: Predictor, classes: tuple[str, ...] = DIGITS, look: str = "auto"
) -> list[dict]:
    """One result per file, in order: {file, digit, class, probability, probabilities} or {file, error};
    `digit` is the class index (MNIST's digit), `class` its name."""
    results: list[dict] = [{"file": str(p)} for p in paths]
    images, done = [], []
    normalise = look_of(classes, look)
    for result, path in zip(results, paths, strict=True):
        try:
            images.append(normalise(load_image(path)))
            done.append(result)
        except ImageError as e:
            result["error"] = str(e)
    if images:
        probs = predictor(np.stack(images))  # (N, 10)
        for result, p in zip(done, probs, strict=True):
            k = int(p.argmax())
            result.update({"digit": k, "class": classes[k], "probability": float(p[k]), "probabilities": p.tolist()})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or GIF files")
    parser.add_argument("--model", default="models/model.pt", help="checkpoint path or MLflow model URI")
    parser.add_argument("--json", action="store_true", help="print one JSON list of results")
    parser.add_argument(
        "--look",
        choices=("auto", "digit", "object"),
        default="auto",
        help="shape pictures like MNIST's digits or Fashion-MNIST's objects (auto: by the model's classes)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    predictor, classes = load_predictor(args.model)
    results = predict_files(args.images, predictor, classes, args.look)
    for r in results:
        if "error" in r:
            print(f"error: {r['file']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['file']}: {r['class']} ({r['probability']:.3f})")
    if args.json:
        print(json.dumps(results, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    run_stage(main)
