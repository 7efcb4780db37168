"""``fedspeech compare`` resolves backbones and tabulates one row per (backbone, task)."""

from pathlib import Path

import pytest

from fedspeech.apps.finetune.compare import resolve_backbone
from fedspeech.cli import main


def test_resolve_backbone_prefers_the_tasks_best_round(tmp_path: Path):
    run = tmp_path / "run"
    for sub in ("checkpoints/round_0001", "checkpoints/round_0002", "best/kws"):
        (run / sub).mkdir(parents=True)
        (run / sub / "config.json").write_text("{}")
    (run / "checkpoints/round_0001/fedspeech_state.json").write_text('{"round": 1}')
    (run / "checkpoints/round_0002/fedspeech_state.json").write_text('{"round": 2}')
    assert resolve_backbone(str(run), "kws") == str(run / "best" / "kws")
    assert resolve_backbone(str(run), "asr") == str(run / "checkpoints" / "round_0002")
    assert resolve_backbone("tiny", "kws") == "tiny"
    with pytest.raises(ValueError, match="not a preset"):
        resolve_backbone(str(tmp_path / "nothing"), "kws")


def test_compare_command_writes_table_and_plot(small_corpus, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            "--manifest",
            str(small_corpus),
            "--backbone",
            "random=tiny",
            "--backbone",
            "random2=tiny",
            "--tasks",
            "kws",
            "--epochs",
            "1",
            "--max-seconds",
            "1",
            "--lr-backbone",
            "1e-4",
            "--lr-head",
            "3e-3",
            "--no-freeze-cnn",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    import json

    rows = json.loads((out / "compare.json").read_text())
    assert [(r["backbone"], r["task"], r["metric"]) for r in rows] == [
        ("random", "kws", "accuracy"),
        ("random2", "kws", "accuracy"),
    ]
    assert rows[0]["score"] == rows[1]["score"]  # same recipe and seed, same init: same result
    assert (out / "compare.png").stat().st_size > 0
