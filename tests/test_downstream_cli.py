"""``fedspeech finetune TASK --federated``: the command runs the federated app end to end."""

from __future__ import annotations

import argparse
import json

import pytest

from fedspeech.apps.finetune import cli
from fedspeech.federated import roundlog


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedspeech")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_federated_kws_runs_rounds_and_rejects_mixed_flags(small_corpus, tmp_path, capsys):
    out, result_json = tmp_path / "run", tmp_path / "result.json"
    code = run_cli(
        [
            "finetune",
            "kws",
            "--manifest",
            str(small_corpus),
            "--federated",
            "--clients",
            "2",
            "--rounds",
            "2",
            "--local-epochs",
            "1",
            "--batch-size",
            "16",
            "--max-seconds",
            "0.5",
            "--lr-head",
            "1e-2",
            "--out",
            str(out),
            "--json",
            str(result_json),
        ]
    )
    assert code == 0
    result = json.loads(result_json.read_text())
    assert result["federated"] and result["num_clients"] == 2 and result["rounds"] == 2
    assert [r["round"] for r in roundlog.read_rounds(out)] == [1, 2]
    assert result["best_round"] in (1, 2) and (out / "result.json").is_file()
    printed = capsys.readouterr().out
    assert "federated (2 clients, 2 rounds)" in printed and "best_round" in printed and "test accuracy" in printed

    with pytest.raises(ValueError, match="--rounds applies to --federated fine-tuning only"):
        run_cli(["finetune", "kws", "--manifest", str(small_corpus), "--rounds", "2"])
    with pytest.raises(ValueError, match="--epochs: federated fine-tuning counts --rounds"):
        run_cli(["finetune", "kws", "--manifest", str(small_corpus), "--federated", "--epochs", "2"])
