"""Methods and tasks are plug-ins: a toy method written in one file appears in manifests, the CLI, the stage
hashes and the tables, and nothing else in the suite names the built-in methods."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.cli import build_parser, main
from experiments.engine.manifest import ManifestError, load_manifest
from experiments.engine.pipeline import Pipeline, student_hash
from experiments.engine.tracking import Tracker
from experiments.methods import registry
from experiments.tables.report import main_table, markdown, runs_frame

TOY = textwrap.dedent(
    '''
    """A toy method: plain MSE between equal-channel features, one term per level."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from experiments.engine.fields import knob
    from experiments.methods.registry import Distillation, MethodSpec, register


    @dataclass(frozen=True)
    class ToyCfg:
        loss_weight: float = knob(0.5, ge=0)
        features: list[str] = knob(default_factory=list, unique=True)


    class Toy(Distillation):
        def __init__(self, ctx):
            super().__init__()
            self.names, self.weight = ctx.features, ctx.config.loss_weight

        def forward(self, student, teacher, batch):
            return {n: self.weight * F.mse_loss(s, t) for n, s, t in zip(self.names, student, teacher)}


    register(
        MethodSpec(
            name="toy",
            title="Toy",
            order=99,
            config=ToyCfg,
            weight_knob="loss_weight",
            build=Toy,
            summary="plain MSE (test plug-in)",
            equal_channels=lambda m: True,
        )
    )
    '''
)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    path = tmp_path / "toy_method.py"
    path.write_text(TOY)
    registry.load_plugin(str(path))
    monkeypatch.setenv(registry.PLUGIN_ENV_VAR, str(path))
    yield path
    registry.unregister("toy")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_toy_method_in_one_file_reaches_manifests_cli_and_tables(toy, tmp_path, monkeypatch, capsys):
    # CLI in a fresh process, found through MASKD_BENCH_PLUGINS only
    env = {**os.environ, registry.PLUGIN_ENV_VAR: str(toy)}
    listed = _cli("methods", env=env)
    assert listed.returncode == 0 and any(line.startswith("toy ") for line in listed.stdout.splitlines())
    assert main(["show", "embedded_detection_smoke", "--set", "toy.loss_weight=2"]) == 0
    assert json.loads(capsys.readouterr().out)["toy"] == {"loss_weight": 2.0, "features": []}
    assert main(["run", "embedded_detection_smoke", "--set", "toy.loss_weight=-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --set toy.loss_weight=-1: toy.loss_weight = -1.0 is not allowed; allowed: >= 0, finite"
    ]
    # --methods choices and stage hashes
    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    methods_action = next(a for a in run_parser._actions if a.dest == "methods")
    assert "toy" in methods_action.choices
    m = load_manifest("embedded_detection_smoke", sets=['methods=["baseline", "toy"]', "protocol.seeds=[0]"])
    assert student_hash(m, "toy", 0) != student_hash(load_manifest(m.source, sets=["toy.loss_weight=2"]), "toy", 0)
    # a real run and the table
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path / "cache"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.run("table/toy", {"kind": "table"}, {}) as parent:
        outcomes = Pipeline(tracker, progress=False).run_manifest(m, parent.info.run_id)
    assert outcomes["toy/s0"].metrics["mAP"] >= 0
    run = tracker.client.get_run(outcomes["toy/s0"].run_id)
    assert any(k.startswith("loss/kd_toy/P3") for k in run.data.metrics)
    table = main_table(runs_frame(tracker.children(parent.info.run_id)))
    assert list(table.method) == ["teacher", "baseline", "toy"]
    assert "| toy |" in markdown(table, [m], "test", None, "toy", parent.info.run_id)


def test_toy_method_refused_for_a_task_it_does_not_declare(toy, tmp_path):
    spec = registry.get("toy")
    registry.register(type(spec)(**{**spec.__dict__, "tasks": ("detection",)}))
    with pytest.raises(ManifestError, match="methods = 'toy' is not allowed"):
        load_manifest("embedded_segmentation_smoke", sets=['methods=["baseline", "toy"]'])


def test_a_config_without_the_declared_weight_knob_is_refused():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoKnob:
        features: list[str]

    with pytest.raises(TypeError, match="lacks a 'loss_weight' field"):
        registry.MethodSpec(name="x", title="X", order=1, config=NoKnob, weight_knob="loss_weight", build=None)


ENGINE = Path(__file__).parents[1] / "experiments"


@pytest.mark.parametrize("folder", ["engine", "tables"])
def test_no_engine_or_table_code_branches_on_a_task_or_method_name(folder):
    """``if task == "detection"`` / ``method == "maskd"`` belong in the plug-ins, not in the stage code."""
    offenders = []
    for path in sorted((ENGINE / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and len(node.comparators) == 1:
                values = [node.left, node.comparators[0]]
                names = {v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)}
                if names & {"detection", "segmentation", "fitnet", "cwd", "fgd", "pkd", "mgd"}:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
