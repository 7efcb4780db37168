"""Swap modules between two checkpoints: which part of a backbone makes it transfer?

    .venv/bin/python benchmarks/transplant.py --base FED_CHECKPOINT --donor CENTRAL_CHECKPOINT \
        --parts wav2vec2.feature_extractor. --out runs/fedssl/hybrid-fed-with-central-cnn

Writes ``--out``: the ``--base`` checkpoint (an HF folder, config and all) with every weight
whose name starts with one of ``--parts`` taken from ``--donor`` instead. Fine-tune it with
``benchmarks/ssl_quality.py --folder NAME=OUT`` to compare with both parents under one
recipe (docs/evaluation.md). Both checkpoints must share the architecture.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def transplant(base: Path, donor: Path, parts: list[str], out: Path) -> int:
    """Write the hybrid checkpoint; returns how many tensors came from the donor."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(base / "model.safetensors"))
    given = load_file(str(donor / "model.safetensors"))
    chosen = [k for k in weights if k.startswith(tuple(parts))]
    if not chosen:
        raise SystemExit(f"--parts {parts}: no weight of {base} starts with them")
    for key in chosen:
        if key not in given or given[key].shape != weights[key].shape:
            raise SystemExit(f"{donor}: no weight {key!r} of shape {tuple(weights[key].shape)}")
        weights[key] = given[key]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(base / "config.json", out / "config.json")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--donor", required=True, type=Path)
    parser.add_argument("--parts", required=True, nargs="+", help="weight-name prefixes taken from --donor")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    count = transplant(args.base, args.donor, args.parts, args.out)
    print(f"{args.out}: {args.base} with {count} tensors ({' '.join(args.parts)}) from {args.donor}")


if __name__ == "__main__":
    main()
