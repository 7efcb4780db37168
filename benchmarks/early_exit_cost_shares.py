"""How much a shallow client saves: the depth-1 training step's FLOPs as a share of the
full-depth step's, with and without the frozen-CNN feature cache, for wav2vec 2.0 base,
large and the early-exit benchmark's 12-layer model (benchmarks/early_exit.py).

A depth-d client always pays a fixed cost (the CNN unless its features are cached, the
feature projection, the positional convolution); this share bounds what training fewer
layers can save. Counted with the profiler's FLOP formulas on 1 s keyword crops, batch 1
(the share does not depend on the batch), random init (FLOPs do not depend on weights).

    .venv/bin/python benchmarks/early_exit_cost_shares.py     # about a minute on 2 cores
"""

from __future__ import annotations

import torch
from transformers import AutoModel

from fedspeech.models.configs import model_config
from fedspeech.models.early_exit import EarlyExitModel
from fedspeech.profiling.depth_planner import measure_depth_costs

MODELS = {
    "wav2vec 2.0 base": ("base", {}),
    "wav2vec 2.0 large": ("large", {}),
    "benchmark 12-layer (tiny width, pre-LN)": ("tiny", {"num_hidden_layers": 12, "do_stable_layer_norm": True}),
}
SECONDS = 1.0
KEYWORDS = 11  # 10 keywords + _unknown_


def shares(preset: str, overrides: dict) -> tuple[int, float, float]:
    torch.manual_seed(0)
    backbone = AutoModel.from_config(model_config(preset, **overrides))
    model = EarlyExitModel(backbone, "classify", KEYWORDS, every=1)
    depths = (1, model.num_layers)
    result = []
    for cached in (False, True):
        lines = {
            c.depth: c for c in measure_depth_costs(model, depths, lengths=(SECONDS / 2, SECONDS), cached_cnn=cached)
        }
        result.append(lines[1].at(SECONDS, 1).train_flops / lines[model.num_layers].at(SECONDS, 1).train_flops)
    return model.num_layers, result[0], result[1]


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'model':42s} {'layers':>6s} {'depth-1 share, CNN recomputed':>30s} {'with CNN cache':>15s}")
    for name, (preset, overrides) in MODELS.items():
        layers, plain, cached = shares(preset, overrides)
        print(f"{name:42s} {layers:6d} {plain:30.3f} {cached:15.3f}")


if __name__ == "__main__":
    main()
