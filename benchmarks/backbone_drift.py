"""How far did pretraining move a backbone, and what does its CNN output look like?

    .venv/bin/python benchmarks/backbone_drift.py --init runs/fedssl/init-... \
        --backbone central=runs/fedssl/centralised-.../checkpoints/round_0006 \
        --backbone fedavg=runs/fedssl/federated-.../checkpoints/round_0006 \
        --manifest runs/fedssl/corpus-40spk-seed0/manifest.tsv [--manifest runs/fedssl/sc-unseen.tsv]

Why: a federated backbone can reach a validation loss near a centralised one's and still
fine-tune far worse (docs/evaluation.md). Two cheap facts tell an under-trained backbone
from a differently trained one: the norm of each weight's change from the shared
initialisation (``|w - w0|``, per CNN conv layer, the feature projection and the positional
convolution), and the CNN's mean squared output on real clips (the feature penalty, or its
absence, shows there). Prints one Markdown table per fact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

#: Weight names summarised (substring -> label): the CNN, the projection into the Transformer
#: and its positional convolution, then the Transformer layers' weights together.
GROUPS = {
    "feature_extractor.conv_layers": "CNN conv layers",
    "feature_projection": "feature projection",
    "pos_conv_embed": "positional convolution",
    "encoder.layers.": "Transformer layers",
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix("wav2vec2."): v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}


def drift(init: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per group: ``|w - w0| / |w0|`` over all of the group's floating tensors together."""
    out = {}
    for pattern, label in GROUPS.items():
        keys = [k for k in init if pattern in k and k in trained and init[k].is_floating_point()]
        if not keys:
            continue
        moved = sum(float((trained[k] - init[k]).pow(2).sum()) for k in keys) ** 0.5
        size = sum(float(init[k].pow(2).sum()) for k in keys) ** 0.5
        out[label] = moved / max(size, 1e-12)
    return out


@torch.no_grad()
def cnn_output_energy(folder: Path, manifest: Path, clips: int) -> float:
    """Mean squared CNN output over ``clips`` labelled test clips (1 s, centre crops)."""
    from fedspeech.data.audio import AudioDataset, make_loader
    from fedspeech.data.manifest import read_manifest
    from fedspeech.models.loading import load_backbone

    chosen = [u for u in read_manifest(manifest) if u.split == "test" and u.label][:clips]
    if not chosen:
        raise SystemExit(f"{manifest}: no labelled test clips")
    model = load_backbone(folder).eval()
    loader = make_loader(AudioDataset(chosen, max_seconds=1.0, seed=0, crop="center"), 8, shuffle=False, seed=0)
    total, count = 0.0, 0
    for batch in loader:
        features = model.feature_extractor(batch["input_values"])
        total += float(features.pow(2).sum())
        count += features.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, type=Path, help="the untrained checkpoint every run started from")
    parser.add_argument("--backbone", action="append", default=[], metavar="NAME=FOLDER", help="repeatable")
    parser.add_argument("--manifest", action="append", default=[], type=Path, help="clips for the CNN output")
    parser.add_argument("--clips", type=int, default=48)
    args = parser.parse_args()
    from fedspeech.cli import quiet_logging

    quiet_logging()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    backbones = {"init": args.init}
    for item in args.backbone:
        name, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"--backbone {item!r}: expected NAME=FOLDER")
        backbones[name] = Path(folder)
    init = _weights(args.init)
    rows = {name: drift(init, _weights(folder)) for name, folder in backbones.items() if name != "init"}
    labels = [label for label in GROUPS.values() if any(label in r for r in rows.values())]
    print("| backbone | " + " | ".join(f"|w - w0| / |w0|, {label}" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row.get(label, float('nan')):.4f}" for label in labels) + " |")
    if args.manifest:
        print(
            "\n| backbone | "
            + " | ".join(
                f"CNN mean squared output, {m.parent.name if m.stem == 'manifest' else m.stem}" for m in args.manifest
            )
            + " |"
        )
        print("|---|" + "---:|" * len(args.manifest))
        for name, folder in backbones.items():
            energies = [cnn_output_energy(folder, m, args.clips) for m in args.manifest]
            print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in energies) + " |")


if __name__ == "__main__":
    main()
