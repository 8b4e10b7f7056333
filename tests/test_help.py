"""Every flag of every script has a help text, and `--help` shows each default once (the scripts'
ArgumentDefaultsHelpFormatter appends "(default: ...)"; a help text must not say it again)."""
import argparse
import importlib.util
import os
import re

import pytest

from conftest import REPO_ROOT, run_script

SCRIPTS = ["train_msf.py", "train_cmsf_self.py", "train_cmsf_semi.py", "train_cmsf_sup.py",
           "eval_knn.py", "eval_linear.py", "transfer_eval.py", "slurm/submit.py",
           "tools/plot_logs.py"]


def parser_of(script):
    """The script's get_args_parser(), imported from its file, as run_main builds it for --help."""
    name = "help_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.get_args_parser()
    if parser.add_help:  # slurm/submit.py builds its full parser itself
        return parser
    return argparse.ArgumentParser(parents=[parser],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def test_the_list_is_every_script():
    top_level = sorted(f for f in os.listdir(REPO_ROOT) if f.endswith(".py") and f != "common.py")
    assert top_level == sorted(s for s in SCRIPTS if "/" not in s)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_one_default(script):
    parser = parser_of(script)
    assert isinstance(parser.formatter_class(prog="x"), argparse.ArgumentDefaultsHelpFormatter)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    missing = [a.option_strings or a.dest for a in actions if not (a.help or "").strip()]
    assert not missing, f"{script}: flags without help: {missing}"
    repeated = [a.option_strings for a in actions
                if re.search(r"\(default|default:", a.help, re.IGNORECASE)]
    assert not repeated, f"{script}: help texts that state the default themselves: {repeated}"
    assert parser.format_help()  # also checks that every help text formats (e.g. a bare % sign)
    for action in actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            rendered = parser._get_formatter()._expand_help(action)
            assert rendered.count("(default:") == 1, (script, action.option_strings, rendered)


def test_help_runs_from_the_command_line():
    result = run_script("train_msf.py", "--help")
    assert result.returncode == 0 and "--mem-bank-size" in result.stdout
    assert "memory bank size M (default: 1024000)" in " ".join(result.stdout.split())
