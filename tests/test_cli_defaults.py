"""The command line's defaults are the config dataclasses' (no literal repeated in argparse)."""
from __future__ import annotations

import pytest

from jaxserve.async_engine import AsyncEngineConfig
from jaxserve.cli import build_parser, engine_config_from_args
from jaxserve.engine import EngineConfig
from server.cli import build_configs
from server.config import ServerConfig


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi"], ["bench"], ["serve"]])
def test_absent_flags_give_the_config_defaults(argv):
    args = build_parser().parse_args(argv)
    assert engine_config_from_args(args) == EngineConfig()


def test_server_flags_give_the_config_defaults():
    engine_cfg, async_cfg, server_cfg = build_configs(build_parser().parse_args(["serve"]))
    assert (engine_cfg, async_cfg, server_cfg) == (EngineConfig(), AsyncEngineConfig(),
                                                   ServerConfig())


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("generate", "bench", "serve", "simulate", "build-kernels"):
        assert command in out
