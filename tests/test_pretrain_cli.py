"""``fedspeech pretrain`` flags: generated from PretrainSettings, presets, runner choices."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fedspeech.apps.pretrain import cli as pretrain_cli
from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.federated.runners import RUNNERS


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pretrain_cli.register(parser.add_subparsers())
    return parser.parse_args(["pretrain", *argv])


def test_every_setting_is_a_flag_and_unset_flags_keep_the_defaults():
    args = parse("--manifest", "m.tsv", "--out", "runs/x", "--rounds", "7", "--lr", "0.002", "--resume")
    settings = pretrain_cli.settings_from_args(args)
    assert (settings.manifest, settings.out_dir, settings.rounds, settings.lr, settings.resume) == (
        "m.tsv",
        "runs/x",
        7,
        0.002,
        True,
    )
    defaults = PretrainSettings()
    untouched = {f.name for f in dataclasses.fields(PretrainSettings)} - {
        "manifest",
        "out_dir",
        "rounds",
        "lr",
        "resume",
    }
    assert all(getattr(settings, name) == getattr(defaults, name) for name in untouched)


def test_preset_fills_in_and_explicit_flags_win():
    settings = pretrain_cli.settings_from_args(parse("--preset", "gao100", "--batch-size", "8"))
    assert (settings.clients_per_round, settings.local_epochs, settings.batch_size) == (20, 1, 8)


def test_runner_choices_match_the_runners_and_bad_values_are_refused(capsys):
    assert pretrain_cli.RUNNERS == RUNNERS
    assert parse("--runner", "deployment").runner == "deployment"
    with pytest.raises(SystemExit):
        parse("--runner", "ray")
    with pytest.raises(SystemExit):
        parse("--rounds", "many")
    assert "--rounds" in capsys.readouterr().err


def test_the_flower_app_config_holds_every_setting_with_its_default():
    """`flwr run .` and the engines read [tool.flwr.app.config]: it must name every setting
    with the same default as PretrainSettings (a new setting must be added there too)."""
    from pathlib import Path

    from fedspeech.federated.engines import app_config

    assert app_config(Path(__file__).resolve().parents[1]) == PretrainSettings().to_run_config()


def test_per_step_schedule_follows_the_run_whatever_the_global_step():
    """train_local hands the schedule the *global* step: round 3's first step must get the
    lr at 2 rounds done (not at 2 rounds plus the steps already taken), the last step the
    lr at the end of round 3."""
    import pytest

    settings = PretrainSettings(rounds=4, warmup_rounds=1, lr=1e-3)
    multiplier = settings.step_lr(server_round=3, local_steps=10, start_step=200)
    assert multiplier(200) * settings.lr == pytest.approx(settings.lr_at_progress(2.05))
    assert multiplier(209) * settings.lr == pytest.approx(settings.lr_at_progress(2.95))
    assert settings.lr_at_progress(2.95) > settings.lr * settings.min_lr_ratio  # not yet at the floor
