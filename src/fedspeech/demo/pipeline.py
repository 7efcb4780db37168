"""The main job as a plain list of ``fedspeech`` commands.

Every step is the exact command line a user would type to do that part alone, run as its
own ``fedspeech`` process, so the demo can never drift from the subcommands and the report
can name, per section, the command that reproduces it. Steps whose inputs are ready run two
at a time (one torch thread each: the tiny model gains little from a second thread, and two
runs use both cores of a laptop). A step whose output is already there is skipped; an
interrupted pretraining run resumes. What each step took is kept in ``OUT/demo.json``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fedspeech.federated import checkpoints, roundlog

RUNNERS = ("inprocess", "simulation", "deployment")
STATE_FILE = "demo.json"


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults fit the 15-minute budget on 2 CPU cores
    (docs/demo.md has the measured step times); ``reduced()`` is the CI-sized version."""

    out: Path = Path("runs/demo")
    speakers: int = 20
    keywords_per_speaker: int = 24
    sentences_per_speaker: int = 12
    clients: int = 10
    rounds: int = 3
    local_epochs: int = 3
    rules: tuple[str, ...] = ("fedavg", "loss")
    downstream_steps: int = 120
    early_exit_rounds: int = 4
    fleet: str = "raspberry-pi-4:0.4,jetson-xavier-nx:0.3,macbook-pro-2019:0.3"
    feasibility_model: str = "base"
    # The centralised reference of docs/pretraining.md (pooled data, same examples seen) at
    # batch 8: at the clients' batch 1 it takes 10x their steps per round, and on seed 0 its
    # codebook collapsed in round 1 (contrastive loss 0: every target the same codevector).
    centralised_batch: int = 8
    seed: int = 0
    runner: str = "inprocess"

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner: must be one of {RUNNERS}, got {self.runner!r}")
        for name in ("speakers", "clients", "rounds", "local_epochs", "downstream_steps", "early_exit_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.rules:
            raise ValueError("rules: name at least one aggregation rule")
        if self.clients > self.speakers:
            raise ValueError(f"clients: {self.clients} clients need more than {self.speakers} speakers")

    @classmethod
    def reduced(cls, out: Path, **overrides: Any) -> DemoConfig:
        """A few speakers, one round per stage: every step and report section, in CI time."""
        small = dict(
            speakers=8,
            keywords_per_speaker=8,
            sentences_per_speaker=4,
            clients=3,
            rounds=1,
            local_epochs=1,
            downstream_steps=10,
            early_exit_rounds=1,
            feasibility_model="tiny",
        )
        return cls(out=Path(out), **{**small, **overrides})

    # ------------------------------------------------------------------ locations

    @property
    def manifest(self) -> Path:
        return self.out / "corpus" / "manifest.tsv"

    @property
    def partition(self) -> Path:
        return self.out / f"partition_speaker_{self.clients}.json"

    def pretrain_dir(self, name: str) -> Path:
        return self.out / "pretrain" / name


@dataclass
class Step:
    """One ``fedspeech`` command of the demo and how to tell it is done."""

    name: str
    title: str
    argv: list[str]
    done: Callable[[], bool]
    resume: Callable[[], bool] = lambda: False  # partly done: add --resume
    outputs: list[str] = field(default_factory=list)
    needs: tuple[str, ...] = ()  # steps that must finish first
    progress: Callable[[], tuple[int, int]] | None = None  # (units done, units in all), e.g. rounds

    def command(self) -> list[str]:
        return self.argv + (["--resume"] if self.resume() else [])

    def shell(self) -> str:
        """The command as a user types it."""
        return shlex.join(["fedspeech", *self.argv])


def _rounds_done(folder: Path) -> int:
    return roundlog.last_round(folder) if roundlog.log_path(folder).exists() else 0


def _finished(folder: Path, rounds: int) -> bool:
    return _rounds_done(folder) >= rounds


def _interrupted(folder: Path, rounds: int) -> bool:
    return 0 < _rounds_done(folder) < rounds


def steps(config: DemoConfig) -> list[Step]:
    """The demo's commands, in the order they are started when their ``needs`` are met."""
    out, manifest, partition = config.out, str(config.manifest), str(config.partition)
    seed = ["--seed", str(config.seed)]
    profile_json = out / "profile" / "tiny.json"
    feasibility_json = out / "feasibility" / f"{config.feasibility_model}.json"
    compare_out, early = out / "downstream", out / "early-exit"
    central = config.pretrain_dir("centralised")
    rules = {rule: config.pretrain_dir(rule) for rule in config.rules}
    pretrain_common = ["--manifest", manifest, "--partition", partition, "--model", "tiny",
                       "--rounds", str(config.rounds), "--local-epochs", str(config.local_epochs),
                       "--max-seconds", "1.5", *seed]  # fmt: skip
    backbones = ["--backbone", "random=tiny", "--backbone", f"centralised={central}"]
    for rule, folder in rules.items():
        backbones += ["--backbone", f"{rule}={folder}"]
    first_rule = config.rules[0]
    modes = 4  # early-exit runs the method and its three baselines

    def rounds_of(folder: Path) -> Callable[[], tuple[int, int]]:
        return lambda: (_rounds_done(folder), config.rounds)

    def early_exit_rounds() -> tuple[int, int]:
        done = sum(_rounds_done(mode) for mode in early.iterdir() if mode.is_dir()) if early.is_dir() else 0
        return done, modes * config.early_exit_rounds

    # fmt: off
    result = [
        Step("corpus", "built-in corpus (espeak-ng voices)",
             ["corpus", "synth", "--out", str(out / "corpus"), "--speakers", str(config.speakers), *seed,
              "--keywords-per-speaker", str(config.keywords_per_speaker),
              "--sentences-per-speaker", str(config.sentences_per_speaker)],
             config.manifest.is_file, outputs=[manifest]),
        Step("partition", f"speaker-disjoint partition into {config.clients} clients",
             ["partition", "--manifest", manifest, "--clients", str(config.clients), "--scheme", "speaker", *seed,
              "--out", partition],
             config.partition.is_file, outputs=[partition], needs=("corpus",)),
    ]
    for rule, folder in rules.items():
        result.append(
            Step(f"pretrain-{rule}",
                 f"federated wav2vec 2.0 pretraining, {rule} ({config.clients} clients, {config.rounds} rounds)",
                 ["pretrain", *pretrain_common, "--strategy", rule, "--runner", config.runner, "--out", str(folder)],
                 partial(_finished, folder, config.rounds), partial(_interrupted, folder, config.rounds),
                 outputs=[str(folder)], needs=("partition",), progress=rounds_of(folder)))
    result += [
        Step("pretrain-centralised", "centralised baseline (pooled data, same examples seen)",
             ["pretrain", *pretrain_common, "--centralised", "--batch-size", str(config.centralised_batch),
              "--out", str(central)],
             partial(_finished, central, config.rounds), outputs=[str(central)], needs=("partition",),
             progress=rounds_of(central)),
        Step("profile", "per-layer memory and compute of a tiny wav2vec 2.0 training step",
             ["profile", "--model", "tiny", "--seconds", "1.5", "--batch", "1", "--repeats", "1",
              "--json", str(profile_json), "--plots", str(out / "profile")],
             profile_json.is_file, outputs=[str(profile_json)]),
        Step("feasibility",
             f"feasibility of wav2vec 2.0 {config.feasibility_model} on the device catalogue and a mixed fleet",
             ["feasibility", "--model", config.feasibility_model, "--seconds", "5.5", "--batch", "4", "--all",
              "--utterances-per-client", "100", "--clients", str(config.clients), "--rounds", "150",
              "--fleet", _fleet_counts(config.fleet, config.clients), "--trend-months", "18",
              "--json", str(feasibility_json)],
             feasibility_json.is_file, outputs=[str(feasibility_json)]),
        Step("early-exit", "early-exit federated fine-tuning for keyword spotting on the heterogeneous fleet",
             ["early-exit", "--manifest", manifest, "--partition", partition, "--task", "kws",
              "--model", str(checkpoints.round_dir(rules[first_rule], config.rounds)),
              "--rounds", str(config.early_exit_rounds), "--fleet", config.fleet, "--runner", config.runner,
              *seed, "--out", str(early)],
             (early / "summary.md").is_file, outputs=[str(early)], needs=(f"pretrain-{first_rule}",),
             progress=early_exit_rounds),
        Step("downstream", "keyword spotting and ASR (CER): random init vs centralised vs federated",
             ["compare", "--manifest", manifest, *backbones, "--tasks", "kws,asr",
              "--max-steps", str(config.downstream_steps), "--no-freeze-cnn", *seed, "--out", str(compare_out)],
             (compare_out / "compare.json").is_file, outputs=[str(compare_out)],
             needs=("pretrain-centralised", *(f"pretrain-{rule}" for rule in rules))),
    ]
    # fmt: on
    return result


def _fleet_counts(fleet: str, clients: int) -> str:
    """``device:fraction,...`` as the ``device:count,...`` that ``feasibility --fleet`` takes
    (largest remainders, so the counts add up to ``clients``)."""
    parts = [(name, float(share)) for name, share in (p.split(":") for p in fleet.split(","))]
    total = sum(share for _, share in parts)
    exact = [clients * share / total for _, share in parts]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - counts[i], reverse=True)[: clients - sum(counts)]:
        counts[i] += 1
    return ",".join(f"{name}:{n}" for (name, _), n in zip(parts, counts, strict=True) if n)


def run_demo(
    config: DemoConfig, jobs: int = 0, on_update: Callable[[dict[str, dict[str, Any]]], None] | None = None
) -> dict[str, Any]:
    """Run every step not yet done, ``jobs`` at a time (0 = 2 on the in-process runner, else
    1), each as its own ``fedspeech`` process with one torch thread and its output in
    ``OUT/logs/STEP.log``; then write ``OUT/report.html``. Returns the demo state (per step:
    command, status, seconds), also written to ``OUT/demo.json``. ``on_update`` gets the
    per-step status after every change (the CLI's progress display)."""
    config.out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or (2 if config.runner == "inprocess" else 1)
    state_path = config.out / STATE_FILE
    previous = json.loads(state_path.read_text()).get("steps", {}) if state_path.is_file() else {}
    all_steps = steps(config)
    state: dict[str, Any] = {"config": _config_dict(config), "jobs": jobs, "steps": {}}
    for step in all_steps:
        state["steps"][step.name] = {"title": step.title, "command": step.shell(), "outputs": step.outputs}
        if step.done():
            state["steps"][step.name].update(status="skipped", seconds=previous.get(step.name, {}).get("seconds"))
        else:
            state["steps"][step.name]["status"] = "waiting"
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: list[str] = []

    def save() -> None:
        state_path.write_text(json.dumps(state, indent=2) + "\n")
        if on_update is not None:
            on_update(state["steps"])

    save()
    logs = config.out / "logs"
    logs.mkdir(exist_ok=True)
    pending = [s for s in all_steps if state["steps"][s.name]["status"] == "waiting"]
    finished = {s.name for s in all_steps if state["steps"][s.name]["status"] == "skipped"}
    while pending or running:
        for step in [s for s in pending if set(s.needs) <= finished][: max(0, jobs - len(running))]:
            if failed:
                break
            pending.remove(step)
            log_file = (logs / f"{step.name}.log").open("w")
            command = [sys.executable, "-m", "fedspeech", "--threads", "1", *step.command()]
            running[step.name] = (subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT), time.time())
            state["steps"][step.name]["status"] = "running"
            save()
        if failed and not running:
            break
        time.sleep(0.5)
        for name, (process, started) in list(running.items()):
            step_state = state["steps"][name]
            step = next(s for s in all_steps if s.name == name)
            step_state["seconds"] = time.time() - started
            if step.progress is not None:
                step_state["progress"] = list(step.progress())
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode == 0:
                step_state["status"] = "done"
                finished.add(name)
            else:
                step_state["status"] = f"failed (exit code {process.returncode})"
                failed.append(name)
        if on_update is not None:
            on_update(state["steps"])
    save()
    if failed or pending:
        name = failed[0] if failed else pending[0].name
        tail = (logs / f"{name}.log").read_text()[-2000:] if (logs / f"{name}.log").is_file() else ""
        raise RuntimeError(f"demo step {name} did not finish: {state['steps'][name]['command']}\n{tail}")
    from fedspeech.demo.report import write_report

    started = time.perf_counter()
    state["report"] = str(write_report(config.out))
    state["steps"]["report"] = {
        "title": "HTML report",
        "command": shlex.join(["fedspeech", "report", str(config.out)]),
        "status": "done",
        "seconds": time.perf_counter() - started,
        "outputs": [state["report"]],
    }
    save()
    return state


def _config_dict(config: DemoConfig) -> dict[str, Any]:
    values = asdict(config)
    values["out"] = str(config.out)
    values["rules"] = list(config.rules)
    return values
