"""Stage 1: fetch the chosen dataset's four IDX files, verify their MD5s, write them to data/raw/
with dataset.json (its name, class names and file names) beside them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.common.errors import DataError, run_stage
from pipeline.common.files import check_writable, write_bytes
from pipeline.data.datasets import DATASETS, Dataset, info_of, write_info
from pipeline.data.sources import Untrusted, sources, verify
from pipeline.params import DownloadConfig, load_section

log = logging.getLogger("pipeline.download")


def fetch(cfg: DownloadConfig, dataset: Dataset) -> tuple[str, dict[str, bytes]]:
    """Try each source in order; return the first whose files all pass the checksums."""
    checksums = dataset.md5 if cfg.checksums is None else cfg.checksums
    failures = []
    for name, source in sources(cfg, dataset):
        log.info("trying %s", name)
        try:
            files = source()
            verify(files, checksums, name)
            return name, files
        except Untrusted:  # a planted file: stop here, no fallback may hide it
            raise
        except Exception as e:  # any failure of one source means: try the next one
            log.warning("%s failed: %s", name, e)
            failures.append(f"  - {name}: {type(e).__name__}: {e}")
    raise DataError(f"no source gave valid {dataset.name} files; tried:\n" + "\n".join(failures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = load_section("download", DownloadConfig)
    dataset = DATASETS[cfg.dataset]
    check_writable(args.out)
    source, files = fetch(cfg, dataset)
    for name in dataset.files:
        write_bytes(args.out / name, files[name])
    write_info(args.out, info_of(dataset))
    log.info("wrote %d verified %s files from %s to %s", len(files), dataset.name, source, args.out)


if __name__ == "__main__":
    run_stage(main)
