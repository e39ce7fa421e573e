"""The README's and the docs' promises, run: the quick start of docs/quickstart.md in order as it is written (the
README shows the same block, checked equal), with a model that detects something, the Python API script as it
is, and every other fa-* command in the README and the docs parsed by its command's own parser, so an example
that stops working fails here."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

from click.testing import CliRunner

from conftest import ROOT
from fa_deploy.bench_cli import main as bench_main
from fa_deploy.export_cli import export_main
from fa_deploy.predict_cli import predict_main
from fa_train.cli import main as train_main

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
QUICKSTART = os.path.join(DOCS, "quickstart.md")  # the docs page that holds the quick start
API_PAGE = os.path.join(DOCS, "api.md")
COMMANDS = {"fa-train": train_main, "fa-bench": bench_main, "fa-export": export_main, "fa-predict": predict_main}


def _read(path):
    with open(path) as f:
        return f.read()


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _marked_block(text, marker, lang):
    assert f"<!-- {marker} -->" in text, marker
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


def _documents():
    return [README] + sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))


def test_every_documented_command_parses():
    """Each fa-* command anywhere in the README and the docs is accepted by its command's parser (flag names,
    choices, types)."""
    seen = {}
    for path in _documents():
        for block in _blocks(_read(path), "sh"):
            for prog, args, _ in _commands(block):
                try:
                    ctx = COMMANDS[prog].make_context(prog, list(args), resilient_parsing=False)
                except Exception as e:  # click's usage errors: name the page and the command
                    raise AssertionError(f"{os.path.relpath(path, ROOT)}: {prog} {shlex.join(args)}: {e}") from e
                ctx.close()
                seen[path] = seen.get(path, 0) + 1
    assert seen.get(README, 0) >= 8 and sum(seen.values()) >= 25, seen


def test_readme_shows_the_docs_quick_start_and_api_script():
    """The README's quick start and Python script are the docs pages' blocks, character for character."""
    readme = _read(README)
    assert _marked_block(readme, "readme-walk", "sh") == _marked_block(_read(QUICKSTART), "readme-walk", "sh")
    assert _marked_block(readme, "api-example", "python") == _marked_block(_read(API_PAGE), "api-example", "python")


def test_readme_keeps_its_first_lines_and_its_size():
    """The two commands first, unchanged; a front page of at most 250 lines."""
    lines = _read(README).splitlines()
    assert lines[2:6] == ["```sh",
                          "make demo   # creates .venv, installs, runs the paper's pipeline on the embedded dataset "
                          "(standard -> AT, FA -> fa-bench)",
                          "make test   # creates .venv if missing, installs, builds the fused kernels (CPU + CUDA), "
                          "runs the whole test suite",
                          "```"]
    assert len(lines) <= 250, len(lines)


def test_quick_start_walk(tmp_path, monkeypatch):
    """The docs page's quick start in order, on the embedded dataset, each command exactly as written (with
    --quiet); its base model must detect something: a non-zero clean AP50 in the bench JSON and boxes drawn."""
    walk = _commands(_marked_block(_read(QUICKSTART), "readme-walk", "sh"))
    assert [p for p, _, _ in walk] == ["fa-train", "fa-train", "fa-train", "fa-bench", "fa-export", "fa-bench",
                                       "fa-predict", "fa-predict"]
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    cache = os.environ["FA_CACHE"]
    for prog, args, runnable in walk:
        assert runnable, (prog, args)
        args = [a.replace("$HOME/.cache/fa-toolkit", cache).replace("~/.cache/fa-toolkit", cache) for a in args]
        r = CliRunner().invoke(COMMANDS[prog], args + (["--quiet"] if prog != "fa-export" else []))
        gated = prog == "fa-bench" and "--backend" in args
        # the deployment gate's FAIL is a documented result (exit 1), never an error (exit 2)
        assert r.exit_code in ((0, 1) if gated else (0,)), (prog, args, r.output)
        if gated:
            assert re.search(r"^gate\b.*: (PASS|FAIL|INCONCLUSIVE)", r.output, re.M), r.output  # gate (...): PASS
    bench = json.loads((tmp_path / "runs" / "bench.json").read_text())
    clean = {row["model"]: row["clean"] for row in bench["rows"]}
    assert set(clean) == {"base", "fa"}, clean
    assert clean["base"] > 0, f"the quick start's base model detects nothing: {clean}"
    assert (tmp_path / "runs" / "report" / "report.html").is_file()
    assert (tmp_path / "runs" / "fa" / "export" / "last.int8.onnx").is_file()
    deploy = json.loads((tmp_path / "runs" / "deploy.json").read_text())
    assert any(row.get("threat") == "own" and row["clean"] > 0 for row in deploy["rows"]), deploy["rows"]
    predictions = json.loads((tmp_path / "runs" / "predict" / "predictions.json").read_text())
    assert predictions, "the quick start's prediction draws no box"
    assert (tmp_path / "runs" / "predict_int8" / "predictions.json").is_file()


def test_api_example_script_runs(tmp_path):
    """The Python API page's script (the README's), as it is, in a fresh process; it prints the threat of each
    row, so the rows of one file are told apart."""
    script = _marked_block(_read(API_PAGE), "api-example", "python")
    (tmp_path / "example.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clean AP50 of the FA model:" in r.stdout and "gate:" in r.stdout and "parity" in r.stdout
    rows = []  # (backend, threat) of each printed row: the threat is the word before "clean"
    for line in r.stdout.splitlines():
        words = line.split()
        if "clean" in words and "advAP" in words and words.index("clean") >= 2:
            i = words.index("clean")
            rows.append((" ".join(words[:i - 1]), words[i - 1]))
    assert len(set(rows)) == len(rows), f"two rows print the same backend and threat: {rows}"
    assert {"own", "transfer", "whitebox", "differential", "worst"} <= {threat for _, threat in rows}, rows
    assert (tmp_path / "runs" / "api" / "deploy.json").is_file()
