"""The rule registry is the one source of truth: every entry builds its strategy, every
option names a settings field of each workload that offers it, and the CLIs offer exactly
the registry's rules and the one runner list."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.apps.finetune.settings import FinetuneSettings
from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.federated import strategies
from fedspeech.federated.rules import EARLYEXIT, FINETUNE, PRETRAIN, RULES, check_rule, rule_names
from fedspeech.federated.runners import RUNNERS, check_runner

SETTINGS = {PRETRAIN: PretrainSettings, FINETUNE: FinetuneSettings, EARLYEXIT: EarlyExitSettings}


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_names_a_strategy_whose_options_are_settings_fields(name):
    rule = RULES[name]
    cls = getattr(strategies, rule.strategy)
    assert issubclass(cls, strategies.RobustFedAvg) and cls.rule_name == name
    for workload in rule.workloads:
        fields = {f.name for f in dataclasses.fields(SETTINGS[workload])}
        assert set(rule.options.values()) <= fields, (name, workload)


def test_settings_refuse_rules_the_registry_does_not_offer_them():
    assert "fedu" in rule_names(PRETRAIN) and "fedu" not in rule_names(FINETUNE)
    with pytest.raises(ValueError, match="strategy: must be one of"):
        check_rule("fedu", FINETUNE)
    with pytest.raises(ValueError, match="strategy"):
        PretrainSettings(strategy="partial")


def _choices(register, *args: str) -> dict[str, tuple]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices[args[0]]  # noqa: SLF001 (argparse has no public accessor)
    return {a.dest: tuple(a.choices) for a in sub._actions if a.choices}


def test_the_clis_offer_the_registry_and_the_runner_list():
    from fedspeech.apps.earlyexit import cli as earlyexit_cli
    from fedspeech.apps.finetune import cli as finetune_cli
    from fedspeech.apps.pretrain import cli as pretrain_cli

    pretrain = _choices(pretrain_cli.register, "pretrain")
    assert pretrain["runner"] == RUNNERS
    finetune = _choices(finetune_cli.register, "finetune")
    assert finetune["strategy"] == rule_names(FINETUNE) and set(finetune["runner"]) <= set(RUNNERS)
    assert _choices(earlyexit_cli.register, "early-exit")["runner"] == RUNNERS
    with pytest.raises(ValueError, match="runner: unknown 'ray'"):
        check_runner("ray")


def test_the_architecture_docs_worked_example_needs_only_a_class_and_a_registry_entry(monkeypatch):
    """docs/architecture.md: a new rule = a strategy class + one Rule entry."""
    import numpy as np

    from fedspeech.federated import aggregation as agg
    from fedspeech.federated.rules import Rule

    class SqrtWeighted(strategies.RobustFedAvg):
        rule_name = "sqrt"
        supports_dp = False

        def _aggregate(self, server_round, reference, updates):
            weights = np.sqrt([u.num_examples for u in updates])
            weights = weights / weights.sum()
            state = agg.weighted_average(reference, [u.state for u in updates], weights)
            return state, strategies._by_node(updates, weights), {}

    monkeypatch.setattr(strategies, "SqrtWeighted", SqrtWeighted, raising=False)
    monkeypatch.setitem(RULES, "sqrt", Rule("sqrt", "SqrtWeighted", "weights sqrt(n_k)"))
    strategy = strategies.make_strategy("sqrt", **{"norm_median_ratio": 3.0})
    assert isinstance(strategy, SqrtWeighted) and strategy.norm_median_ratio == 3.0
    assert PretrainSettings(strategy="sqrt").strategy == "sqrt"
    assert "sqrt" in rule_names(PRETRAIN) and "sqrt" in rule_names(FINETUNE)
