"""The README's promises, run: the quick-start block in order (scaled down by the flags the README documents), the
Python API script as it is, and every other fa-* command in the README parsed by its command's own parser, so a
README example that stops working fails here."""
import os
import re
import shlex
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from conftest import ROOT
from fa_deploy.bench_cli import main as bench_main
from fa_deploy.export_cli import export_main
from fa_deploy.predict_cli import predict_main
from fa_train.cli import main as train_main

README = os.path.join(ROOT, "README.md")
COMMANDS = {"fa-train": train_main, "fa-bench": bench_main, "fa-export": export_main, "fa-predict": predict_main}
# the walk's scale-down flags, as the README's quick start documents them
SCALE = {"fa-train": "--epochs 1 --max-images 16 --max-test-images 8 --img-size 64 --width-mult 0.125 "
                     "--depth-mult 0.2 --workers 0",
         "fa-bench": "--max-images 4 --steps 1,2 --workers 0",
         "fa-export": "--calib-images 8 --verify-images 2",
         "fa-predict": ""}


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _marked_block(text, marker, lang):
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return _blocks(after, lang)[0]


MODULES = {"fa_train.cli": "fa-train", "fa_deploy.cli": "fa-bench", "fa_deploy.bench_cli": "fa-bench",
           "fa_deploy.export_cli": "fa-export", "fa_deploy.predict_cli": "fa-predict"}


def _commands(block):
    """fa-* command lines of a shell block (continuations joined, comments dropped): (prog, args, runnable), where
    runnable means the line is the command itself (not under torchrun or inside another construct). Optional parts
    written [--flag value] count as given."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, t in enumerate(tokens):
            prog = t if t in COMMANDS else (MODULES.get(tokens[i + 1]) if t == "-m" and i + 1 < len(tokens) else None)
            if prog:
                rest = tokens[i + (1 if t in COMMANDS else 2):]
                args = [a.lstrip("[").rstrip("]") for a in rest if a not in ("...", "[", "]")]
                out.append((prog, [a for a in args if a], i == 0))
                break
    return out


def test_every_readme_command_parses():
    """Each fa-* command anywhere in the README is accepted by its command's parser (flag names, choices, types)."""
    text = open(README).read()
    seen = 0
    for block in _blocks(text, "sh"):
        for prog, args, _ in _commands(block):
            ctx = COMMANDS[prog].make_context(prog, list(args), resilient_parsing=False)
            ctx.close()
            seen += 1
    assert seen >= 20, seen


def test_quick_start_walk(tmp_path, monkeypatch):
    """The quick start's commands in order, on the embedded dataset, each with the documented scale-down flags."""
    text = open(README).read()
    walk = _commands(_marked_block(text, "readme-walk", "sh"))
    assert [p for p, _, _ in walk][:4] == ["fa-train", "fa-train", "fa-train", "fa-bench"]
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    cache = os.environ["FA_CACHE"]
    for prog, args, runnable in walk:
        assert runnable, (prog, args)
        args = [a.replace("$HOME/.cache/fa-toolkit", cache).replace("~/.cache/fa-toolkit", cache) for a in args]
        r = CliRunner().invoke(COMMANDS[prog], args + shlex.split(SCALE[prog]) + (["--quiet"] if prog != "fa-export"
                                                                                   else []))
        assert r.exit_code == 0, (prog, args, r.output)
    assert (tmp_path / "runs" / "bench.json").is_file() and (tmp_path / "runs" / "report" / "report.html").is_file()
    assert (tmp_path / "runs" / "fa" / "export" / "last.int8.onnx").is_file()
    assert (tmp_path / "runs" / "predict" / "predictions.json").is_file()
    assert (tmp_path / "runs" / "predict_int8" / "predictions.json").is_file()


def test_api_example_script_runs(tmp_path):
    """The README's Python script, as it is, in a fresh process."""
    script = _marked_block(open(README).read(), "api-example", "python")
    (tmp_path / "example.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean AP50 of the FA model:" in r.stdout and "gate:" in r.stdout and "parity" in r.stdout
    assert (tmp_path / "runs" / "api" / "deploy.json").is_file()
