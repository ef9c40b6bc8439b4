from __future__ import annotations

import subprocess
import sys

import pytest

from kubeloop.cli import build_parser


@pytest.mark.parametrize("command", [[], ["operator"], ["crds"], ["version"]])
def test_every_subcommand_has_help(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kubeloop", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: kubeloop" in out


def test_crds_to_stdout_lists_four_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["crds"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for kind in ("TrainingRun", "ModelVersion", "ModelDeployment", "DriftPolicy"):
        assert f"kind: {kind}\n" in out
