"""The deployment recipes in deploy/ call commands and flags that exist."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from paligemma_edge.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_systemd_unit_commands_parse():
    lines = (DEPLOY / "paligemma-edge.service").read_text().splitlines()
    commands = [line.split("=", 1)[1] for line in lines if line.startswith(("ExecStart=", "ExecStartPre="))]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command)
        assert argv[0].endswith("/paligemma-edge")
        args = build_parser().parse_args(argv[1:])
        assert args.command in ("serve", "verify")
    assert "KillSignal=SIGINT" in lines  # serve shuts down cleanly on SIGINT


def test_container_command_parses():
    lines = (DEPLOY / "Dockerfile.jetson").read_text().splitlines()
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    command = json.loads(next(line for line in lines if line.startswith("CMD ")).split(" ", 1)[1])
    assert entrypoint == ["paligemma-edge"]
    args = build_parser().parse_args(command)
    assert args.command == "serve" and args.host == "0.0.0.0"
