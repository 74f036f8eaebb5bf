"""How predict's picture normalisation costs accuracy: test images written as PNG files (and negated,
like a product photo on white) read back through `pipeline.predict` with each look, against the
same images given to the network as arrays.

    python -m bench.predict_looks --model models/model.pt --data data/processed [-n 500]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import predict
from pipeline.data.datasets import IMAGE_SIZE
from pipeline.data.splits import load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("-n", type=int, default=500, help="the first n test images")
    args = parser.parse_args()
    images, labels = load_split(args.data / "test.pt")
    images = images[: args.n].numpy().reshape(-1, IMAGE_SIZE, IMAGE_SIZE)  # uint8 (n, 28, 28)
    labels = labels[: args.n].numpy()
    predictor, classes = predict.load_predictor(args.model)
    print(f"arrays: {(predictor(images).argmax(1) == labels).mean():.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, list[Path]] = {"as stored": [], "negated": []}
        for i, image in enumerate(images):
            for name, pixels in (("as stored", image), ("negated", 255 - image)):
                path = Path(tmp) / f"{name[0]}{i}.png"
                Image.fromarray(pixels).save(path)
                files[name].append(path)
        for look in ("digit", "object"):
            for name, paths in files.items():
                results = predict.predict_files(paths, predictor, classes, look)
                accuracy = np.mean([r.get("digit") == y for r, y in zip(results, labels, strict=True)])
                print(f"look={look:6s} {name:9s}: {accuracy:.3f}")
    print(f"predict's own choice for this model: --look {'digit' if classes == predict.DIGITS else 'object'}")


if __name__ == "__main__":
    main()
