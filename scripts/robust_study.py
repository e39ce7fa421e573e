"""The robustness study of issue 22: which training recipe gives the best worst case under the project's own attack
suite, and does FA's alignment add anything on top of a strong recipe.

    python scripts/robust_study.py --base runs/demo/standard/last.pt [--out runs/robust_study]
                                   [--quick] [--dry-run] [--recipes pgd1,pgdk,mix,free] [--methods at,fa]
                                   [--eps 0.01,0.02,0.03] [--epochs 8] [--bench-images N]

For each recipe (today's PGD-1 at 0.01; PGD-3 at 0.03 from a random start; PGD-3 at 0.03 with mixed objectives;
Free AT m=4 at 0.03), each with (`fa`) and without (`at`) FA's alignment: fine-tune from the base checkpoint with the
demo's preset (configs/demo.yaml), then `fa-bench --attack suite` at eps 0.01, 0.02 and 0.03 and `fa-bench --sanity`
(with --transfer-from the base model); the base model itself is attacked the same way, the reference row.
Collected per model: clean AP50, the paper's advAP and the suite's worst-case AP50 at each eps, the sanity verdict,
the training time. Written to OUT: study.json, study.md (the table) and
frontier.png (clean AP50 against worst-case AP50, one panel per eps, one point per model).

Resumable: a stage whose output exists (eval.json of a training, bench_eps*.json, sanity/sanity.json) is not run
again, so an interrupted study continues where it stopped. --quick: a smoke scale (64 px, a width-0.125 model
trained on 8 images, 1 epoch, 8 test images, the suite at one eps with short attacks, no sanity): it only checks
that every stage runs, its numbers mean nothing. --dry-run prints the commands and runs nothing. --eps, --epochs and
--bench-images make a smaller study than the full one (its title says so).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (description, fa-train flags)
RECIPES = {
    "pgd1": ("PGD-1 at 0.01 (the paper)", ["--pgd-steps", "1", "--train-eps", "0.01", "--train-step-size", "0.01",
                                          "--no-random-start", "--train-objective", "det"]),
    "pgdk": ("PGD-3 at 0.03, random start, warm-up", ["--pgd-steps", "3", "--train-eps", "0.03",
                                                      "--train-step-size", "0.025", "--random-start",
                                                      "--eps-warmup-epochs", "1", "--train-objective", "det"]),
    "mix": ("PGD-3 at 0.03, random start, mixed objectives", ["--pgd-steps", "3", "--train-eps", "0.03",
                                                              "--train-step-size", "0.025", "--random-start",
                                                              "--eps-warmup-epochs", "1", "--train-objective", "mix"]),
    "free": ("Free AT m=4 at 0.03", ["--free-replays", "4", "--train-eps", "0.03", "--train-step-size", "0.03",
                                     "--eps-warmup-epochs", "1", "--train-objective", "det"]),
}
METHODS = ("at", "fa")
BASE_RECIPE = "the base model (standard training), before fine-tuning"
EPS = (0.01, 0.02, 0.03)

FULL = {"train": ["--epochs", "8", "--lr", "0.0005", "--warmup-iters", "0", "--eval-every", "0"],
        "bench": [], "eps": EPS, "sanity": True}
QUICK = {"train": ["--epochs", "1", "--lr", "0.0005", "--warmup-iters", "0", "--eval-every", "0", "--img-size",
                   "64", "--max-images", "8", "--max-test-images", "4", "--batch-size", "4", "--workers", "0"],
         "bench": ["--max-images", "4", "--steps", "1,2", "--apgd-iterations", "2", "--img-size", "64",
                   "--workers", "0", "--batch-size", "4"],
         "eps": (0.03,), "sanity": False}


class StudyError(RuntimeError):
    pass


def _scale(args) -> dict:
    """QUICK or FULL, with --eps, --epochs and --bench-images applied (a smaller study, said so in its title)."""
    scale = dict(QUICK if args.quick else FULL)
    if args.eps:
        scale["eps"] = tuple(args.eps)
    if args.epochs:
        scale["train"] = _set_flag(scale["train"], "--epochs", str(args.epochs))
    if args.bench_images:
        scale["bench"] = _set_flag(scale["bench"], "--max-images", str(args.bench_images))
    return scale


def _set_flag(flags: list, name: str, value: str) -> list:
    flags = list(flags)
    if name in flags:
        flags[flags.index(name) + 1] = value
    else:
        flags += [name, value]
    return flags


def plan(args) -> list:
    """[(kind, name, command, output that marks it done)] in order."""
    scale = _scale(args)
    py = sys.executable
    steps = []
    for eps in scale["eps"]:  # the reference: the base model itself, before any adversarial fine-tuning
        out = os.path.join(args.out, "base", f"bench_eps{eps:g}.json")
        steps.append(("bench", "base", [py, "-m", "fa_deploy.bench_cli", "--weights", args.base, "--attack", "suite",
                                        "--eps", f"{eps:g}", *scale["bench"], "--json", out], out))
    for r in args.recipes:
        for m in args.methods:
            name = f"{r}_{m}"
            run = os.path.join(args.out, name)
            cmd = [py, "-m", "fa_train.cli", "--config", args.config, "--init", args.base, "--method", m,
                   *RECIPES[r][1], *scale["train"], "--seed", str(args.seed), "--out", run, "--quiet"]
            steps.append(("train", name, cmd, os.path.join(run, "eval.json")))
            for eps in scale["eps"]:
                out = os.path.join(run, f"bench_eps{eps:g}.json")
                steps.append(("bench", name, [py, "-m", "fa_deploy.bench_cli", "--weights", os.path.join(run, "last.pt"),
                                              "--attack", "suite", "--eps", f"{eps:g}", *scale["bench"], "--json", out],
                              out))
            if scale["sanity"] and not args.no_sanity:
                sdir = os.path.join(run, "sanity")
                steps.append(("sanity", name, [py, "-m", "fa_deploy.bench_cli", "--weights",
                                               os.path.join(run, "last.pt"), "--sanity", sdir, "--transfer-from",
                                               args.base, *scale["bench"]], os.path.join(sdir, "sanity.json")))
    return steps


def run_step(kind, name, cmd, done, log):
    if os.path.isfile(done):
        log(f"[{name}] {kind}: done before ({done})")
        return
    log(f"[{name}] {kind}: {shlex.join(cmd)}")
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if kind == "sanity" and r.returncode == 1 and os.path.isfile(done):
        pass  # a failed check is a result (recorded from sanity.json), not a broken study
    elif r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
        raise StudyError(f"[{name}] {kind} failed (exit {r.returncode}): " + " | ".join(tail))
    if kind == "train":
        with open(os.path.join(os.path.dirname(done), "time.json"), "w") as f:
            json.dump({"train_seconds": seconds}, f)
    log(f"[{name}] {kind}: {seconds:.0f} s")


def collect(args, also: list) -> list:
    """One row per run: the base, each recipe x method, then `also` ([(name, recipe, method, folder)])."""
    scale = _scale(args)
    rows = []
    runs = [("base", BASE_RECIPE, "standard", os.path.join(args.out, "base"))]
    runs += [(f"{r}_{m}", RECIPES[r][0], m, os.path.join(args.out, f"{r}_{m}")) for r in args.recipes
             for m in args.methods]
    runs += also
    for name, recipe, m, run in runs:
        row = {"model": name, "recipe": recipe, "method": m}
        try:
            with open(os.path.join(run, "time.json")) as f:
                row["train_seconds"] = json.load(f)["train_seconds"]
        except (OSError, ValueError, KeyError):
            row["train_seconds"] = None
        for eps in scale["eps"]:
            path = os.path.join(run, f"bench_eps{eps:g}.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                b = json.load(f)["rows"][0]
            row["clean"] = b.get("clean")
            row[f"advAP@{eps:g}"] = b.get("advAP")
            row[f"worst@{eps:g}"] = b.get("worst")
        spath = os.path.join(run, "sanity", "sanity.json")
        if os.path.isfile(spath):
            with open(spath) as f:
                s = json.load(f)
            row["sanity"] = "FAIL" if s.get("failures") else "PASS"
        rows.append(row)
    return rows


def _also_run(run: str) -> tuple:
    """(name, recipe, method, folder) of a fa-train run folder given with --also, from its config.yaml."""
    import yaml

    path = os.path.join(run, "config.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
        method, train = cfg["method"], cfg["train"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise StudyError(f"--also {run}: not a fa-train run folder ({path}: {e})")
    if method.get("name") == "standard":
        attack = "standard training"
    elif (method.get("free_replays") or 1) > 1:
        attack = f"Free AT m={method['free_replays']} at {method.get('train_eps')}"
    else:
        attack = f"PGD-{method.get('pgd_steps')} at {method.get('train_eps')}"
        if method.get("random_start"):
            attack += ", random start"
    objective = method.get("objective") or "det"
    if objective != "det" and method.get("name") != "standard":
        attack += f", {'mixed objectives' if objective == 'mix' else objective}"
    start = f", from {train['init']}" if train.get("init") else ", from scratch"
    return os.path.basename(os.path.normpath(run)), f"{attack}, {train.get('epochs')} epochs{start}", \
        method.get("name"), run


def write_report(args, rows) -> list:
    scale = _scale(args)
    cols = ["model", "recipe", "clean"] + [f"{k}@{e:g}" for e in scale["eps"] for k in ("advAP", "worst")] + \
           ["sanity", "train_seconds"]

    def cell(v, col):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.0f}" if col == "train_seconds" else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c), c) for c in cols) + " |")
    split = f"the first {args.bench_images} test images" if args.bench_images else "the test split"
    epochs = f", {args.epochs} fine-tuning epochs" if args.epochs else ""
    title = f"Robustness study ({'quick smoke scale: numbers mean nothing' if args.quick else 'demo scale'}{epochs}), " \
            f"base {args.base}, AP50 on {split}"
    md = os.path.join(args.out, "study.md")
    with open(md, "w") as f:
        f.write(f"{title}\n\n" + "\n".join(lines) + "\n")
    js = os.path.join(args.out, "study.json")
    with open(js, "w") as f:
        json.dump({"title": title, "columns": cols, "rows": rows, "recipes": {k: RECIPES[k] for k in args.recipes},
                   "quick": args.quick}, f, indent=2)
    written = [js, md]
    panels = [e for e in scale["eps"] if any(r.get("clean") is not None and r.get(f"worst@{e:g}") is not None
                                              for r in rows)]
    if panels:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.6), squeeze=False)
        for ax, eps in zip(axes[0], panels):
            pts = [r for r in rows if r.get("clean") is not None and r.get(f"worst@{eps:g}") is not None]
            for r in pts:
                marker = {"at": "o", "fa": "^"}.get(r["method"], "s")
                ax.scatter(r["clean"], r[f"worst@{eps:g}"], marker=marker)
                ax.annotate(r["model"], (r["clean"], r[f"worst@{eps:g}"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
            ax.set_xlabel("clean AP50")
            ax.set_ylabel(f"worst-case AP50 over the suite at eps {eps:g}")
            ax.set_title(f"eps {eps:g} (o: at, ^: fa, s: base)")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, max([r[f"worst@{eps:g}"] for r in pts] + [0.05]) * 1.15)
            ax.grid(alpha=0.3)
        fig.suptitle("robustness frontier: clean AP50 against the suite's per-image worst case")
        png = os.path.join(args.out, "frontier.png")
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(png)
    return written


def _eps_list(text: str) -> tuple:
    try:
        eps = tuple(float(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    if not eps or any(not 0 < e <= 1 for e in eps):
        raise argparse.ArgumentTypeError(f"every budget must be in (0, 1]: {text!r}")
    return eps


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base", required=True, help="base checkpoint (the demo's standard model): --init and teacher")
    ap.add_argument("--out", default="runs/robust_study", help="study folder")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"),
                    help="fa-train preset of the fine-tuning (its model must be the base checkpoint's)")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    ap.add_argument("--methods", default=",".join(METHODS), help="at (no alignment) and/or fa (with)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--eps", type=_eps_list, help="comma-separated evaluation budgets (default: 0.01,0.02,0.03; "
                    "--quick: 0.03)")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default: 8; --quick: 1)")
    ap.add_argument("--bench-images", type=int, help="evaluate the first N test images only (default: the split)")
    ap.add_argument("--also", default="", help="comma-separated fa-train run folders trained and attacked elsewhere "
                    "(their bench_eps*.json and sanity/ as the study writes them): extra rows and points")
    ap.add_argument("--quick", action="store_true", help="smoke scale (minutes; numbers mean nothing)")
    ap.add_argument("--no-sanity", action="store_true", help="skip fa-bench --sanity")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = ap.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.also = [d.strip() for d in args.also.split(",") if d.strip()]
    bad = [r for r in args.recipes if r not in RECIPES] + [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown recipe or method: {', '.join(bad)} (recipes: {', '.join(RECIPES)}; methods: at, fa)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    steps = plan(args)
    if args.dry_run:
        for kind, name, cmd, done in steps:
            state = "done" if os.path.isfile(done) else "todo"
            print(f"{state} {kind:<6} {name:<10} {shlex.join(cmd)}")
        return 0
    if not os.path.isfile(args.base):
        print(f"robust_study.py: error: --base {args.base}: checkpoint not found", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        also = [_also_run(d) for d in args.also]  # before hours of training: a wrong folder is named at once
        for s in steps:
            run_step(*s, log)
    except StudyError as e:
        print(f"robust_study.py: error: {e}", file=sys.stderr)
        return 2
    rows = collect(args, also)
    for path in write_report(args, rows):
        log(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
