"""The command line's frame: every verb registered the same way, one error line."""

import argparse

from grata import cli


def test_every_verb_registers_the_same_way():
    for verb in cli.VERBS:
        module = __import__(f"grata.cli.{verb}", fromlist=["register"])
        sub = argparse.ArgumentParser().add_subparsers()
        handlers = module.register(sub)
        assert handlers and all(callable(h) for h in handlers.values())
        assert set(handlers) == set(sub.choices)
    cli.build_parser()
    assert set(cli.COMMANDS) == {"synth", "train-source", "export", "adapt", "serve", "report", "bench",
                                 "calibrate"}


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
