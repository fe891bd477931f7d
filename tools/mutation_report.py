"""Write the mutation-testing report into docs/testing.md from docs/mutation/<package>.json and the survivor notes.

    python tools/mutation_report.py            # rewrite the report section of docs/testing.md
    python tools/mutation_report.py --todo     # list survivors that have no note yet (as JSON stubs)

tools/mutation_notes.json explains survivors, keyed by mutant name: ``{"change": "<the mutated line>",
"equivalent": "<why no test can tell>"}``, or ``"accepted"`` instead of ``"equivalent"`` for a mutant that differs
but only where no sound test can pin it (said why). A note whose ``change`` no longer matches the mutant (the source
moved) is reported as stale, not applied. ``"_tests": {package: [test files]}`` names the tests added for survivors;
survivors of earlier runs (kept in docs/mutation/<package>.json) that the latest run kills are counted against them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "mutation"
NOTES = ROOT / "tools" / "mutation_notes.json"
DOC = ROOT / "docs" / "testing.md"
BEGIN, END = "<!-- mutation report: begin -->", "<!-- mutation report: end -->"
ORDER = ["methods", "routing", "init", "merging", "federated", "serve"]
DETECTED = ("killed", "timeout", "segfault")  # a test failed, or the mutant hung or crashed the worker


def change_of(mutant: dict) -> str:
    """The mutated line(s), stripped: the note key that survives renumbering."""
    return " / ".join(ln[1:].strip() for ln in mutant.get("diff", []) if ln.startswith("+"))


def load() -> tuple[list[dict], dict]:
    reports = [json.loads(p.read_text()) for p in RESULTS.glob("*.json")]
    reports.sort(key=lambda r: ORDER.index(r["package"]) if r["package"] in ORDER else len(ORDER))
    notes = json.loads(NOTES.read_text()) if NOTES.exists() else {}
    return reports, notes


def _minutes(r: dict) -> str:
    """Wall time of the package's full run, and of the rerun of its survivors (0: the full run was interrupted)."""
    full = f"{r['seconds'] / 60:.0f} min" if r["seconds"] else "interrupted"
    return full + (f" + rerun {r['rerun_seconds'] / 60:.0f} min" if "rerun_seconds" in r else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render(reports: list[dict], notes: dict) -> str:
    lines = [BEGIN, "", "| package | mutants | killed | timeout | survived | no tests | kill rate | run time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        c = r["counts"]
        total = sum(c.values())
        detected = sum(c.get(s, 0) for s in DETECTED)
        lines.append(
            f"| {r['package']} | {total} | {c.get('killed', 0)} | {c.get('timeout', 0)} | {c.get('survived', 0)} "
            f"| {c.get('no tests', 0)} | {100 * detected / total:.1f}% | {_minutes(r)} |"
        )
    missing = [p for p in ORDER if p not in {r["package"] for r in reports}]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`make mutation PACKAGE={missing[0]}`)."]
    lines += ["", "Kill rate = (killed + timeout) / mutants; a mutant no selected test reaches counts as a survivor.",
              "Files and tests per package:", ""]
    for r in reports:
        lines.append(f"- {r['package']}: `{' '.join(r['mutated'])}` against `{' '.join(r['tests'])}`")
    for r in reports:
        by_name = {m["name"]: m for m in r["mutants"]}
        survivors = [m for m in r["mutants"] if m["status"] not in DETECTED]
        earlier = r.get("earlier_survivors", {})
        # mutant names are stable while the source is: an earlier survivor killed now was killed by an added test
        killed_later = [n for n in earlier if n in by_name and by_name[n]["status"] in DETECTED]
        lines += ["", f"### {r['package']}: {len(survivors)} survivors", ""]
        if survivors:
            lines += ["| where | mutation | why it survives |", "|---|---|---|"]
        for m in survivors:
            note = notes.get(m["name"], {})
            if note.get("change") != change_of(m):
                why = "**unexplained**" + (" (stale note)" if note else "")
            elif "equivalent" in note:
                why = "equivalent: " + note["equivalent"]
            else:
                why = "not killed: " + note["accepted"]
            where = f"{m['file'].removeprefix('src/lorakit/')}:{m.get('line') or '?'}"
            lines.append(f"| {where} | `{_cell(change_of(m))}` ({m['status']}) | {_cell(why)} |")
        if killed_later:
            added = ", ".join(f"`{t}`" for t in notes.get("_tests", {}).get(r["package"], [])) or "(none listed)"
            lines += ["", f"{len(killed_later)} survivors of earlier runs are now killed by the tests added for them: "
                      f"{added}."]
    lines += ["", END]
    return "\n".join(lines)


def todo(reports: list[dict], notes: dict) -> dict:
    out = {}
    for r in reports:
        for m in r["mutants"]:
            note = notes.get(m["name"], {})
            if m["status"] not in DETECTED and (note.get("change") != change_of(m) or not {"equivalent", "accepted"} & set(note)):
                out[m["name"]] = {"change": change_of(m), "line": m.get("line"), "was": m["diff"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--todo", action="store_true", help="print survivors without an equivalence note")
    args = parser.parse_args()
    reports, notes = load()
    if args.todo:
        print(json.dumps(todo(reports, notes), indent=1, ensure_ascii=False))
        return
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(head + render(reports, notes) + tail)
    tmp.replace(DOC)
    print(f"wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
