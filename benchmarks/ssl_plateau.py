"""Why did the tiny wav2vec 2.0 stay at chance? The diagnosis behind docs/evaluation.md.

Trains the tiny model centrally on the ssl_quality benchmark's unlabelled pool (40-speaker
built-in corpus, 20 utterances per training speaker, batch 8 x 1.5 s crops, AdamW with a
30-step warm-up, gradient clipping 5) under one or more named objective variants, and prints
every 50 steps the mean training loss, the validation loss on 16 dev utterances (fixed
crops and masks), the codebook perplexity and the chance level ln(1 + distractors):

    .venv/bin/python benchmarks/ssl_plateau.py paper penalty0 [--steps 250] [--work DIR]
    .venv/bin/python benchmarks/ssl_plateau.py --list

``--one-batch`` trains on a single batch instead (``--fixed-masks``: same masks and
distractors every step), the check that the loss and its gradients can learn at all.
Each variant takes about 2-4 minutes per 250 steps on one thread.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
from pathlib import Path

# (model config overrides, objective overrides, lr). The tiny preset itself carries
# feature_penalty_weight 0 since this diagnosis, so "the paper" sets 10 explicitly.
SHORT = dict(num_negatives=20, mask_time_length=5)
VARIANTS: dict[str, tuple[dict, dict, float]] = {
    "paper": (dict(feature_penalty_weight=10.0), {}, 1e-3),
    "neg20-span5": ({**SHORT, "feature_penalty_weight": 10.0}, {}, 2e-3),
    "neg20-span5-fast-gumbel": ({**SHORT, "feature_penalty_weight": 10.0}, {"gumbel": (2.0, 0.5, 0.995)}, 2e-3),
    "neg20-span5-lr5e-4": ({**SHORT, "feature_penalty_weight": 10.0}, {}, 5e-4),
    "neg20-span5-penalty1": ({**SHORT, "feature_penalty_weight": 1.0}, {}, 2e-3),
    "neg20-span5-penalty0.1": ({**SHORT, "feature_penalty_weight": 0.1}, {}, 2e-3),
    "neg20-span5-penalty0": ({**SHORT, "feature_penalty_weight": 0.0}, {}, 2e-3),
    "penalty0": (dict(feature_penalty_weight=0.0), {}, 1e-3),  # the paper's objective otherwise
    "layernorm-cnn": (
        {**SHORT, "feature_penalty_weight": 10.0, "feat_extract_norm": "layer", "conv_bias": True},
        {},
        2e-3,
    ),
    "layernorm-cnn-diversity1": (
        {
            **SHORT,
            "feature_penalty_weight": 10.0,
            "feat_extract_norm": "layer",
            "conv_bias": True,
            "diversity_loss_weight": 1.0,
        },
        {},
        2e-3,
    ),
}


def pool(work: Path) -> list:
    """The ssl_quality benchmark's unlabelled pool (built on first use, then reused)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fedspeech.data.manifest import read_manifest
    from ssl_quality import corpus, pretraining_manifest

    return read_manifest(pretraining_manifest(corpus(work, 40, 0), 20, 0))


def run(name: str, utterances: list, steps: int, seed: int, one_batch: bool, fixed_masks: bool) -> None:
    import numpy as np
    import torch
    from transformers import Wav2Vec2ForPreTraining

    from fedspeech.data.audio import AudioDataset, make_loader
    from fedspeech.models.configs import model_config
    from fedspeech.ssl.train import LRSchedule, evaluate_loss, train_local
    from fedspeech.ssl.wav2vec2 import GumbelSchedule, Wav2Vec2Objective

    overrides, objective_overrides, lr = VARIANTS[name]
    objective_overrides = dict(objective_overrides)
    if "gumbel" in objective_overrides:
        objective_overrides["gumbel"] = GumbelSchedule(*objective_overrides["gumbel"])
    torch.manual_seed(seed)
    config = model_config("tiny", **overrides)
    model = Wav2Vec2ForPreTraining(config)
    objective = Wav2Vec2Objective.from_config(config, seed=seed, **objective_overrides)
    train = AudioDataset([u for u in utterances if u.split == "train"], max_seconds=1.5, seed=seed)
    dev = make_loader(AudioDataset([u for u in utterances if u.split == "dev"][:16], max_seconds=1.5, crop="center"), 8)

    def batches():
        for epoch in itertools.count():
            train.set_epoch(epoch)
            yield from make_loader(train, 8, shuffle=True, seed=epoch)

    stream = batches()
    trained = objective  # what training sees; evaluation always uses fresh masks on dev
    if one_batch:
        batch = {k: v for k, v in next(stream).items() if k != "utterances"}
        if fixed_masks:  # the same masks and distractors every step
            rng = np.random.default_rng(seed)
            masks = objective.sample_mask(objective.frame_mask(model, batch), rng)
            negatives = objective.sample_negatives(masks, rng)
            trained = _FixedMasks(objective, masks, negatives)
        stream = itertools.repeat(batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = LRSchedule(warmup_steps=30, decay="constant")
    chance = math.log(1 + objective.num_negatives)
    print(
        f"{name}: overrides {overrides}, objective {objective_overrides}, lr {lr:g}, seed {seed}; "
        f"chance ln(1 + {objective.num_negatives}) = {chance:.3f}",
        flush=True,
    )
    step = 0
    while step < steps:
        result = train_local(
            model,
            trained,
            itertools.islice(stream, 50),
            optimizer_factory=lambda _: optimizer,
            lr_schedule=schedule,
            max_grad_norm=5.0,
            start_step=step,
        )
        step = result.end_step
        with torch.no_grad():
            model.eval()
            first = {k: v for k, v in next(iter(dev)).items() if k != "utterances"}
            perplexity = float(objective(model, first, np.random.default_rng(0)).perplexity)
        print(
            f"{name} step {step}: train loss {result.mean_loss_last_epoch:.3f}, "
            f"val loss {evaluate_loss(model, objective, dev):.3f}, perplexity {perplexity:.1f} of "
            f"{config.num_codevector_groups * config.num_codevectors_per_group}, chance {chance:.3f}",
            flush=True,
        )


class _FixedMasks:
    """The objective with one batch's masks and distractors frozen."""

    def __init__(self, objective, masks, negatives):
        self.objective, self.masks, self.negatives = objective, masks, negatives
        self.num_negatives = objective.num_negatives

    def before_step(self, model, step: int) -> None:
        self.objective.before_step(model, step)

    def __call__(self, model, batch, rng=None):
        return self.objective.compute_loss(model, batch, self.masks, self.negatives)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help="see --list")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="model init, masks and crops")
    parser.add_argument("--one-batch", action="store_true", help="train on a single batch")
    parser.add_argument("--fixed-masks", action="store_true", help="with --one-batch: fixed masks and distractors")
    parser.add_argument("--work", default=None, help="corpus cache (the ssl_quality benchmark's --work works)")
    args = parser.parse_args()
    if args.list or not args.variants:
        for name, (overrides, objective, lr) in VARIANTS.items():
            print(f"{name:26s} config {overrides} objective {objective} lr {lr:g}")
        return
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    import torch

    torch.set_num_threads(1)
    utterances = pool(Path(args.work or tempfile.mkdtemp(prefix="ssl_plateau-")))
    for name in args.variants:
        run(name, utterances, args.steps, args.seed, args.one_batch, args.fixed_masks)


if __name__ == "__main__":
    main()
