"""Mutation testing of lorakit's maths with mutmut 3, one package at a time (`make mutation`).

    python tools/mutation.py merging [--max-children 1]     # one package
    python tools/mutation.py all                            # every package, one after the other
    python tools/mutation.py merging --rerun                # the last run's survivors (and every mutant of a function changed since) with the current tests
    python tools/mutation.py init --files src/lorakit/init/eva.py   # one file afresh; the other files' results are kept
    python tools/mutation.py init --rerun --files src/lorakit/init/eva.py   # that file's survivors; the others' results are kept

Each package is mutated in its own work folder, build/mutation/<package>/ (a copy of src/, tests/ and
pyproject.toml; mutmut writes mutants/ there), and only that package's tests run against its mutants. The
results (every mutant: file, line, status, and the diff of each one not killed) go to docs/mutation/<package>.json;
tools/mutation_report.py turns them into the report in docs/testing.md.

Two changes to mutmut's defaults, both made here rather than in the source:
- mutmut leaves decorated functions alone. The merge functions (``@merger``), the federated strategies
  (``@strategy``), ``@torch.no_grad()`` functions and context managers are the maths this run is for, so they are
  mutated too: the public function keeps its decorators and becomes the trampoline; the mutant copies drop them.
  Functions under ``functools.lru_cache`` stay unmutated (the cache would keep the original's results) and so
  do properties, and the registration decorators themselves (``merger``, ``strategy``): they run at import, before
  a mutant is switched on, so no test could kill their mutants. Config validation and serialisation
  (``__post_init__``, ``to_dict``) and init/checks.py (the initialisers' conformance checker) are not maths: left out.
- Tests run with ``-x -p no:cacheprovider`` and a per-mutant CPU-time limit (mutmut's: 15 × the tests' time).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
OUT = ROOT / "docs" / "mutation"

# package -> (files to mutate, relative to the root; the tests that check them)
PACKAGES: dict[str, tuple[list[str], list[str]]] = {
    "methods": (  # the adapter variants; the routed methods are package "routing"
        ["src/lorakit/methods/*.py"],
        ["tests/methods", "tests/conformance", "tests/formats/test_peft_parity.py",
         "tests/formats/test_moe_params.py"],  # LoRA on parameters (MoE experts) lives in methods/lora*.py
    ),
    # the factor maths; not the calibration plumbing (hooks, settings, seeding) nor checks.py (the conformance checker)
    # the routed methods (mixtures of LoRA experts and their routers)
    "routing": (
        [f"src/lorakit/methods/{f}.py" for f in ("routing", "meteora", "lora_mixer", "smora", "experts")],
        ["tests/methods/test_meteora.py", "tests/methods/test_lora_mixer.py", "tests/methods/test_smora.py",
         "tests/methods/test_routing_mutants.py", "tests/conformance"],
    ),
    "init": ([f"src/lorakit/init/{f}.py" for f in ("lora_ga", "pissa", "olora", "orthogonal", "ipca", "eva",
                                                   "conversion", "shira_masks")],
             ["tests/init", "tests/methods/test_shira.py"]),  # SHiRA's mask calibration is tested with SHiRA
    # the merge maths; not combine.py / carry.py (input checks, tensor layouts, configs, modules_to_save)
    "merging": ([f"src/lorakit/merging/{f}.py" for f in ("linear", "task_vectors", "knots", "lego", "lowrank", "protocol")],
                ["tests/merging"]),
    "federated": (
        ["src/lorakit/federated/strategies/*.py", "src/lorakit/federated/aggregation.py"],
        ["tests/federated/test_fed_strategies.py", "tests/federated/test_fed_mutants.py"],
    ),
    "serve": (["src/lorakit/serve/ops.py"], ["tests/serve/test_batched_lora.py", "tests/serve/test_ops_mutants.py"]),
}
# not maths: argument parsing and printing
ROUTED = [f"src/lorakit/methods/{f}.py" for f in ("routing", "meteora", "lora_mixer", "smora", "experts")]
SKIP_FILES = ["src/lorakit/merging/cli.py", "src/lorakit/init/checks.py", "*/__init__.py"]
# decorators whose functions are mutated anyway (matched on the decorator's source text)
# functions that only run at import (registration decorators), before mutmut switches a mutant on: not mutated
IMPORT_TIME = {"merger", "strategy"}
# config validation and serialisation, not maths
NOT_MATHS = {"__post_init__", "to_dict"}
MUTATED_DECORATORS = re.compile(r"^(merger|strategy|torch\.no_grad|contextlib\.contextmanager|staticmethod|classmethod)\b")


def _patch_mutmut() -> None:
    """Mutate functions under the decorators in MUTATED_DECORATORS; mutant copies drop the decorators."""
    import libcst as cst
    from mutmut.mutation import file_mutation as fm

    module = cst.Module([])

    def decorators_ok(node: cst.FunctionDef) -> bool:
        return all(MUTATED_DECORATORS.match(module.code_for_node(d.decorator)) for d in node.decorators)

    def patched(self, node, _skip=fm.MutationVisitor._skip_node_and_children):
        if isinstance(node, cst.FunctionDef) and node.name.value in IMPORT_TIME | NOT_MATHS:
            return True
        if not (_skip(self, node) and isinstance(node, cst.FunctionDef) and node.decorators and decorators_ok(node)):
            return _skip(self, node)
        position = self.get_metadata(fm.PositionProvider, node, None)
        if position and position.start.line in self._ignored_node_lines:  # "# pragma: no mutate" still holds
            return True
        return _skip(self, node.with_changes(decorators=[]))

    fm.MutationVisitor._skip_node_and_children = patched

    arrange = fm.function_trampoline_arrangement

    def arrangement(function, mutants, class_name):
        decls, nodes, assigns, names = arrange(function, mutants, class_name)
        keep = [d for d in function.decorators if module.code_for_node(d.decorator) in ("classmethod", "staticmethod")]
        # the trampoline (nodes[0]) keeps every decorator; the copies keep only classmethod / staticmethod
        nodes = [nodes[0]] + [n.with_changes(decorators=keep) for n in nodes[1:]]
        return decls, nodes, assigns, names

    fm.function_trampoline_arrangement = arrangement


def _prepare(package: str) -> Path:
    """A fresh work folder holding copies of src/, tests/ and pyproject.toml."""
    work = WORK / package
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "docs").mkdir()
    shutil.copy2(ROOT / "docs" / "methods.md", work / "docs" / "methods.md")  # read by tests/conformance
    return work


def _refresh(work: Path) -> None:
    """The current src/ and tests/ in a kept work folder; mutmut makes new mutants of source files changed since."""
    shutil.copytree(ROOT / "src", work / "src", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # copy2 keeps unchanged files' times
    shutil.rmtree(work / "tests")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _changed_functions(work: Path, patterns: list[str]) -> list[str]:
    """Mutant-name globs of the package's functions whose source differs from the work folder's copy (a fix since)."""
    import ast

    def functions(text: str) -> dict[str, str]:
        out = {}
        for node in ast.parse(text).body:
            for inner, cls in ([(node, None)] if not isinstance(node, ast.ClassDef)
                               else [(n, node.name) for n in node.body]):
                if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[f"xǁ{cls}ǁ{inner.name}" if cls else f"x_{inner.name}"] = ast.dump(inner)
        return out

    found = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        rel, copy = str(path.relative_to(ROOT)), work / path.relative_to(ROOT)
        if any(fnmatch.fnmatch(rel, p) for p in patterns) and copy.exists() and copy.read_bytes() != path.read_bytes():
            old, new = functions(copy.read_text()), functions(path.read_text())
            module = rel[4:-3].replace("/", ".")
            found += [f"{module}.{name}*" for name, body in new.items() if old.get(name) != body]
    return found


def _unrun(work: Path, patterns: list[str]) -> list[str]:
    """Mutants of the package's files in the work folder without a result (their function changed in an earlier run)."""
    names = []
    for meta in sorted((work / "mutants" / "src").rglob("*.py.meta")):
        rel = str(meta.relative_to(work / "mutants").with_suffix(""))
        if any(fnmatch.fnmatch(rel, p) for p in patterns):
            names += [k for k, v in json.loads(meta.read_text())["exit_code_by_key"].items() if v is None]
    return names


def _configure(package: str, files: list[str] | None, tests: list[str] | None = None) -> None:
    from mutmut import configuration

    mutate, default_tests = PACKAGES[package]
    mutate, tests = files or mutate, tests or default_tests
    base = configuration._load_config()
    configuration._config = dataclasses.replace(
        base,
        source_paths=[Path("src")],
        resolved_mutated_source_paths=[Path.cwd() / "mutants" / "src"],
        only_mutate=mutate,
        do_not_mutate=SKIP_FILES + (ROUTED if package == "methods" else []),
        pytest_add_cli_args=["-p", "no:cacheprovider", "-W", "ignore"],
        pytest_add_cli_args_test_selection=tests,
        use_git_change_detection=False,
        also_copy=base.also_copy + [Path("docs")],
    )


def _line_of(name: str, diff: str, source: list[str]) -> int:
    """The 1-based line of ``source`` that mutant ``name`` changes: the first match inside its function (0: not found)."""
    function = name.rpartition(".")[2].rsplit("__mutmut_", 1)[0].split("ǁ")[-1].removeprefix("x_")
    start = next((i for i, ln in enumerate(source, 1) if re.match(rf"\s*def {re.escape(function)}\(", ln)), 1)
    removed = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    for want in removed:
        hits = [i for i, ln in enumerate(source, 1) if i >= start and ln.strip() == want.strip()]
        if hits:
            return hits[0]
    return 0


def _collect(package: str, seconds: float, files: list[str] | None) -> dict:
    """Every mutant of ``package``: name, file, status; line and diff for those not killed."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    mutate = files or PACKAGES[package][0]
    mutants = []
    for meta in sorted(Path("mutants/src").rglob("*.py.meta")):
        path = meta.relative_to("mutants").with_suffix("")
        if not any(fnmatch.fnmatch(str(path), pattern) for pattern in mutate):
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        source = path.read_text().splitlines()
        for name, code in sorted(data.exit_code_by_key.items(), key=lambda kv: _natural(kv[0])):
            status = status_by_exit_code[code]
            row = {"name": name, "file": str(path), "status": status}
            if status != "killed":
                diff = get_diff_for_mutant(name, path=path)
                row["line"] = _line_of(name, diff, source)
                row["diff"] = [ln for ln in diff.splitlines()[2:] if ln[:1] in "+-"]
            mutants.append(row)
    counts: dict[str, int] = {}
    for m in mutants:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    from mutmut.configuration import config

    tests = config().pytest_add_cli_args_test_selection
    return {"package": package, "mutated": mutate, "tests": tests, "seconds": round(seconds),
            "counts": counts, "mutants": mutants}


def _earlier_survivors(previous: Path) -> dict[str, list[str]]:
    """Survivors of every earlier run (name -> diff), so the report can say which ones added tests now kill."""
    if not previous.exists():
        return {}
    old = json.loads(previous.read_text())
    earlier = dict(old.get("earlier_survivors", {}))
    earlier.update({m["name"]: m["diff"] for m in old["mutants"] if m["status"] not in ("killed", "timeout")})
    return earlier


def _merge_mutants(report: dict, old: dict) -> None:
    """The previous run's mutants of the files ``report`` did not run, merged into ``report`` (counts too)."""
    kept = [m for m in old["mutants"] if not any(fnmatch.fnmatch(m["file"], f) for f in report["mutated"])]
    report["mutants"] = sorted(kept + report["mutants"], key=lambda m: (old["mutated"].index(m["file"])
                                                                        if m["file"] in old["mutated"] else len(old["mutated"])))
    report["counts"] = {}
    for m in report["mutants"]:
        report["counts"][m["status"]] = report["counts"].get(m["status"], 0) + 1


def _keep_other_files(report: dict, old: dict) -> dict:
    """A fresh run of some of a package's files: the previous run's results for its other files, merged in.

    The run time stays the full run's; this run's counts as a rerun. Earlier survivors of the files run again are
    dropped (their mutant names follow the current source, which may have moved)."""
    rerun = set(report["mutated"])
    _merge_mutants(report, old)
    report["earlier_survivors"] = {n: d for n, d in report["earlier_survivors"].items()
                                   if not any(n.startswith(f[4:-3].replace("/", ".") + ".") for f in rerun)}
    first = [f for f in report["mutated"] if f not in old["mutated"]]
    report["mutated"] = old["mutated"] + first
    if first:  # the first run of these files: part of the package's full run time
        report["seconds"], report["rerun_seconds"] = old["seconds"] + report["seconds"], old.get("rerun_seconds", 0)
    else:
        report["rerun_seconds"], report["seconds"] = old.get("rerun_seconds", 0) + report["seconds"], old["seconds"]
    return report


def _natural(name: str) -> tuple:
    head, _, num = name.rpartition("_")
    return (head, int(num)) if num.isdigit() else (name, 0)


def run(package: str, max_children: int, files: list[str] | None = None, rerun: bool = False,
        collect_only: bool = False, only: str | None = None) -> dict:
    """Mutate ``package``, run its tests against every mutant, and write docs/mutation/<package>.json.

    ``rerun``: keep the last run's mutants and results, take the current tests, and run only the survivors that
    tools/mutation_notes.json does not explain again. ``collect_only`` (with ``rerun``): write the report of the
    results in the work folder as they are (after an interrupted rerun) without running anything.
    """
    previous = OUT / f"{package}.json"
    again: list[str] = []
    tests = None  # a rerun keeps the test selection of the run it continues (another one makes mutmut start over)
    if rerun:
        work = WORK / package
        os.chdir(work)
        if previous.exists():
            old = json.loads(previous.read_text())
            files = files or (old["mutated"] if old["mutated"] != PACKAGES[package][0] else None)
            tests = old["tests"]
        else:  # an interrupted first run: its results are in the work folder
            _configure(package, files)
            old = _collect(package, 0, files)
            previous.parent.mkdir(parents=True, exist_ok=True)
            previous.write_text(json.dumps(old) + "\n")
        # survivors already explained in tools/mutation_notes.json are not run again
        notes_path = ROOT / "tools" / "mutation_notes.json"
        notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
        explained = {n for n, v in notes.items() if isinstance(v, dict) and {"equivalent", "accepted"} & set(v)}
        again = [m["name"] for m in old["mutants"] if m["status"] not in ("killed", "timeout") and m["name"] not in explained
                 and fnmatch.fnmatch(m["name"], only or "*")]
        if not collect_only:  # functions changed since (a fix): all their mutants run again, with the new source
            again += _changed_functions(work, files or PACKAGES[package][0]) + _unrun(work, files or PACKAGES[package][0])
            _refresh(work)
        mutate = files
    elif files and (WORK / package / "mutants").exists() and previous.exists():  # more files: the work folder is kept
        work = WORK / package
        _refresh(work)
        # mutmut overwrites the mutants of files it is not told to mutate with plain copies: name the earlier ones too
        earlier = json.loads(previous.read_text())["mutated"]
        mutate = earlier + [f for f in files if f not in earlier]
        for copy in (work / "mutants" / "src").rglob("*.py"):  # plain copies of files mutated now for the first time
            rel = str(copy.relative_to(work / "mutants"))
            if any(fnmatch.fnmatch(rel, f) for f in files) and not copy.with_suffix(".py.meta").exists():
                copy.unlink()
        if mutate != earlier:  # which tests reach the new files' functions: mutmut records it in a full stats run only
            (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    else:
        work = _prepare(package)
        mutate = files
    os.chdir(work)
    os.environ.pop("PYTHONPATH", None)  # the mutated copy under mutants/src must be what the tests import
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != (ROOT / "src").resolve()]
    _patch_mutmut()
    _configure(package, mutate, tests)
    from mutmut import __main__ as mm

    start = time.time()
    try:
        if files and not rerun:  # the given files afresh, even where the work folder holds earlier results
            again = [f[4:-3].replace("/", ".") + ".*" for f in files]
        if (not rerun or again) and not collect_only:
            mm._run(again, max_children)
    except SystemExit as e:
        if e.code:
            raise
    report = _collect(package, time.time() - start, files)
    report["earlier_survivors"] = _earlier_survivors(previous)
    if files and not rerun and previous.exists():  # some files of the package: keep the others' results
        report = _keep_other_files(report, json.loads(previous.read_text()))
    if rerun:  # the run time of the whole package, and of the survivors' rerun
        last = json.loads(previous.read_text())
        if files and set(last["mutated"]) - set(files):  # a rerun of some files (--files): keep the others' results
            _merge_mutants(report, last)
            report["mutated"] = last["mutated"]
        report["seconds"], report["rerun_seconds"] = last["seconds"], last.get("rerun_seconds", 0) + report["seconds"]
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / f".{package}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(OUT / f"{package}.json")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", choices=[*PACKAGES, "all"])
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutant workers (default 1)")
    parser.add_argument("--files", nargs="+", help="mutate only these files of the package (globs from the root)")
    parser.add_argument("--rerun", action="store_true", help="run only the last run's survivors again, with the current tests")
    parser.add_argument("--collect", action="store_true", help="with --rerun: report the work folder's results, run nothing")
    parser.add_argument("--only", help="with --rerun: only the survivors whose mutant name matches this glob")
    args = parser.parse_args()
    if args.package == "all":
        # one child process per package: mutmut keeps global state
        import subprocess

        extra = ["--rerun"] if args.rerun else []
        for name in PACKAGES:
            subprocess.run([sys.executable, __file__, name, "--max-children", str(args.max_children), *extra], check=True)
        return
    report = run(args.package, args.max_children, args.files, args.rerun or args.collect, args.collect, args.only)
    print(f"{args.package}: {report['counts']} in {report['seconds']} s -> docs/mutation/{args.package}.json")


if __name__ == "__main__":
    main()
