"""``lorakit train-many JOBS.yaml``: several `lorakit train` jobs at once on one base (`lorakit.train.multi`).

The jobs file (YAML or JSON) names the shared base and lists the jobs; a job's fields are `lorakit train`'s
options with the same names and defaults (``rank``, ``alpha``, ``targets``, ``lr``, ``batch_size``,
``max_steps``, ``seed``, ...), ``defaults`` applies fields to every job::

    model: tiny-llama        # zoo name or local HF model directory; its new weights are drawn from `seed`
    kind: classification     # or causal_lm
    seed: 0
    defaults: {task: tweets, max_train: 400, max_length: 48}
    jobs:
      - {name: r4, rank: 4, lr: 1e-3}
      - {name: r16, rank: 16, lr: 5e-4, batch_size: 8, seed: 3}

Every job is checked (fields, its task, its targets on the base) before anything trains; a job that cannot run
is named with the field (one line, exit status 2). Each job writes ``OUT/<name>/`` as `lorakit train -o` does
(``run.json``, ``adapter/`` with ``lorakit_base.json``, ``summary.json``, ``metrics.jsonl``, checkpoints every
``eval_every`` steps); ``--resume`` continues every job from its own last checkpoint. A job that fails while
training (non-finite loss, malformed data) is reported on stderr and the others finish; the exit status is then 1.
A job equals ``lorakit train`` with the same fields when its ``seed`` equals the file's ``seed`` (the base model
and a classification head are drawn from that seed; the job's seed draws its data, order and adapter).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

FIELDS = ("name", "task", "method", "rank", "alpha", "dropout", "targets", "lr", "batch_size", "epochs", "max_steps",
          "eval_every", "max_train", "max_eval", "max_length", "seed", "optimizer")
COUNTS = ("rank", "batch_size", "epochs", "max_steps", "eval_every", "max_train", "max_eval", "max_length")
OPTIONAL = ("max_steps", "max_train", "max_eval")
TOP = ("model", "kind", "seed", "defaults", "jobs")


def add_parser(sub, train_defaults) -> None:
    """Register ``train-many``; ``train_defaults()`` gives `lorakit train`'s defaults (a Namespace)."""
    p = sub.add_parser("train-many", help="train several LoRA jobs at once on one base (a jobs file; LoRAFusion)")
    p.add_argument("jobs_file", help="YAML or JSON jobs file (see `lorakit.train.multi_cli`)")
    p.add_argument("-o", "--out", default="runs/train-many", help="output directory (one sub-directory per job)")
    p.add_argument("--max-tokens", type=int, default=1024, help="padded tokens per shared micro-batch")
    p.add_argument("--no-base-dropout", action="store_true",
                   help="turn the base model's dropout off (refused otherwise: shared passes cannot draw each job's masks)")
    p.add_argument("--resume", action="store_true", help="continue every job from its last checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace runs or files already in --out")
    p.set_defaults(func=lambda args: run(args, train_defaults()))


def read_jobs(path: str, defaults: argparse.Namespace) -> tuple[dict, list[argparse.Namespace]]:
    """(top-level settings, one Namespace of `lorakit train` options per job), every field checked."""
    import yaml  # a dependency of transformers

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such jobs file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'jobs' list (and 'model', 'kind', 'seed')")
    unknown = sorted(set(data) - set(TOP))
    if unknown:
        raise ValueError(f"{path}: unknown top-level field '{unknown[0]}'; fields: {', '.join(TOP)}")
    top = {"model": data.get("model", defaults.model), "kind": data.get("kind", defaults.kind),
           "seed": data.get("seed", defaults.seed)}
    if top["kind"] not in ("classification", "causal_lm"):
        raise ValueError(f"{path}: field 'kind': expected classification or causal_lm, found {top['kind']!r}")
    if not isinstance(top["seed"], int) or isinstance(top["seed"], bool):
        raise ValueError(f"{path}: field 'seed': expected a whole number, found {top['seed']!r}")
    shared = data.get("defaults") or {}
    if not isinstance(shared, dict):
        raise ValueError(f"{path}: field 'defaults': expected a mapping of job fields")
    jobs, names = [], set()
    for i, raw in enumerate(data["jobs"]):
        where = f"{path}: job {raw.get('name', i + 1)!r}" if isinstance(raw, dict) else f"{path}: job {i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping of fields")
        args = argparse.Namespace(**{**vars(defaults), "seed": top["seed"], **shared, **raw,
                                     "model": top["model"], "kind": top["kind"]})
        _check_fields(where, {**shared, **raw}, args)
        if args.name in names:
            raise ValueError(f"{where}: field 'name': another job has this name")
        names.add(args.name)
        jobs.append(args)
    return top, jobs


def _check_fields(where: str, given: dict, args: argparse.Namespace) -> None:
    def bad(field, expected):
        raise ValueError(f"{where}: field '{field}': expected {expected}, found {getattr(args, field, None)!r}")

    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field '{unknown[0]}'; job fields: {', '.join(FIELDS)}")
    if "name" not in given or not isinstance(args.name, str) or not args.name or set(args.name) & set("/\\") \
            or args.name.startswith("."):
        bad("name", "a name that can be a directory name")
    for f in COUNTS:
        v = getattr(args, f)
        if not (v is None and f in OPTIONAL) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            bad(f, "a whole number >= 1")
    if not isinstance(args.seed, int) or isinstance(args.seed, bool):
        bad("seed", "a whole number")
    for f in ("lr", "alpha", "dropout"):
        v = getattr(args, f)
        if isinstance(v, str):  # YAML reads 1e-3 as a string
            try:
                setattr(args, f, float(v))
            except ValueError:
                bad(f, "a number")
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            bad(f, "a number")
    if args.lr <= 0:
        bad("lr", "a number > 0")
    if isinstance(args.targets, list) and all(isinstance(t, str) for t in args.targets):
        args.targets = ",".join(args.targets)
    if not isinstance(args.targets, str) or not args.targets:
        bad("targets", "module names (a list or comma-separated) or a regex")
    if not isinstance(args.task, str):
        bad("task", "a bundled task name or a local data path")


def run(args: argparse.Namespace, train_defaults: argparse.Namespace) -> int:
    """Check every job, train them together, write each job's run directory."""
    from .. import jobs as train_jobs
    from ..core.outputs import check_output
    from ..data import load_task
    from . import TrainConfig
    from .multi import Job, JobError, MultiTrainer

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, found {args.max_tokens}")
    top, specs = read_jobs(args.jobs_file, train_defaults)
    out = Path(args.out)
    if not args.resume:
        check_output(out, inputs=[args.jobs_file], overwrite=args.overwrite)
    tasks = {}
    for s in specs:
        try:
            tasks[s.name] = load_task(s.task, s.kind).subsampled(s.max_train, s.max_eval, seed=s.seed)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ValueError(f"{args.jobs_file}: job '{s.name}': field 'task': {str(e).splitlines()[0]}") from None
    labels = {s.name: tasks[s.name].num_labels for s in specs}
    if top["kind"] == "classification" and len(set(labels.values())) > 1:
        first = specs[0].name
        other = next(n for n, k in labels.items() if k != labels[first])
        raise ValueError(f"{args.jobs_file}: job '{other}': field 'task': {labels[other]} labels, job '{first}' has "
                         f"{labels[first]}; the jobs share one base and its head shape")
    train_jobs._quiet_transformers()
    from .. import zoo

    model, tokenizer = zoo.load(top["model"], task="seq_cls" if top["kind"] == "classification" else "causal_lm",
                                num_labels=labels[specs[0].name], seed=top["seed"])
    trainer = MultiTrainer(model, max_tokens=args.max_tokens, disable_dropout=args.no_base_dropout)
    splits, saved = {}, {}
    for s in specs:
        run_dir = out / s.name
        saved[s.name] = train_jobs._check_run_dir(run_dir, args.resume, True)
        settings = {"model": top["model"], **{k: getattr(s, k, None) for k in train_jobs.RUN_KEYS}}
        if saved[s.name] is not None:
            train_jobs._check_resumable(run_dir, saved[s.name], settings, model)
        splits[s.name] = tasks[s.name].encode(tokenizer, s.max_length)
        try:
            adapter = train_jobs.method_config(s.method, s.rank, s.alpha, s.dropout, train_jobs._targets(s.targets),
                                               s.kind, base_model=top["model"])
        except (KeyError, ValueError, TypeError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            raise ValueError(f"{args.jobs_file}: job '{s.name}': field 'method': {msg.splitlines()[0]}") from None
        config = TrainConfig(lr=s.lr, batch_size=s.batch_size, epochs=s.epochs, max_steps=s.max_steps,
                             eval_every=s.eval_every, save_every=s.eval_every, output_dir=str(run_dir),
                             resume=args.resume, seed=s.seed, optimizer=s.optimizer, progress=False)
        job = Job(s.name, adapter, splits[s.name]["train"], config, splits[s.name]["validation"] or None)
        try:
            trainer.add(job)
        except (JobError, KeyError) as e:
            raise ValueError(f"{args.jobs_file}: {str(e).splitlines()[0]}") from None
        except (ValueError, TypeError) as e:  # apply's refusals: the targets do not fit the base
            raise ValueError(f"{args.jobs_file}: job '{s.name}': field 'targets': {str(e).splitlines()[0]}") from None
        s.settings = settings
    if not args.resume and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    for s in specs:  # every job is checked: from here on the run directories are ours
        if saved[s.name] is None:
            train_jobs._write_json(out / s.name / train_jobs.RUN_FILE, {"settings": s.settings,
                                                                        "base": trainer.base_record(s.name)})
    print(f"lorakit train-many: {len(specs)} jobs on {top['model']}: {', '.join(s.name for s in specs)}", file=sys.stderr)
    results = trainer.run()
    failed = 0
    for s in specs:
        r = results[s.name]
        summary = {"status": r.status, "steps": r.steps, "trainable_parameters": r.trainable_params,
                   "wall_time_s": round(r.wall_time, 1)}
        if r.status == "done":
            summary["adapter"] = str(trainer.save(s.name, out / s.name / "adapter"))
            if len(splits[s.name]["test"]):
                summary["test"] = trainer.closed[s.name].evaluate(splits[s.name]["test"], batch_size=64)
        else:
            failed += 1
            summary["error"] = r.error
            print(f"lorakit train-many: {r.error}", file=sys.stderr)
        train_jobs._write_json(out / s.name / "summary.json", summary)
        print(json.dumps({"job": s.name, **summary}))
    return 1 if failed else 0
