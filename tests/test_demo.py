"""The main job at CI size: every step runs through its `fedspeech` command, the HTML report
has every section with its plots embedded and the command that reproduces it, and a rerun
skips what is done."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest

from fedspeech.demo.pipeline import DemoConfig, run_demo, steps
from fedspeech.demo.report import SECTIONS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    config = DemoConfig.reduced(tmp_path_factory.mktemp("demo") / "out")
    return config, run_demo(config)


def test_every_step_runs_and_the_report_has_every_section(demo):
    config, state = demo
    assert list(state["steps"]) == [s.name for s in steps(config)] + ["report"]
    assert all(s["status"] == "done" for s in state["steps"].values())
    page = (config.out / "report.html").read_text()
    assert re.findall(r'<section id="([a-z-]+)"', page) == list(SECTIONS)
    assert 'class="missing"' not in page  # every section found its step's output
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5 and all(len(i) > 1000 for i in images)  # profile, loss, downstream, 2 early exit
    for step in steps(config):  # each section names the command that reproduces it, in full
        assert html.escape(step.shell()) in page
    assert "fedavg" in page and "centralised" in page and "Raspberry Pi 4" in page


def test_a_rerun_skips_every_finished_step(demo):
    config, _ = demo
    again = run_demo(config)
    assert all(s["status"] == "skipped" for name, s in again["steps"].items() if name != "report")
    recorded = json.loads((config.out / "demo.json").read_text())
    assert recorded["config"]["clients"] == config.clients


def test_bad_demo_settings_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="runner"):
        DemoConfig(out=tmp_path, runner="cloud")
    with pytest.raises(ValueError, match="clients"):
        DemoConfig(out=tmp_path, speakers=4, clients=10)
