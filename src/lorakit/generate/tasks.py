"""The zoo's tasks: small binary classifications carved from the bundled data, each with a description.

A `ZooTask` names a source (`wordnet-category`, `wordnet-pos`, `tweets`, or `fortunes` with any of Debian's fortune
categories), the two or more source labels it keeps, and a one-sentence description in plain English. Tasks whose
``split`` is ``"heldout"`` are kept apart: the generators never see their adapters; the benchmark evaluates on them.
Every held-out task shares its data source and one class with some expert task, so related experts exist.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data import Task, subsample

DEFINITION = "Is this dictionary definition about {} or {}?"
POS = "Is this dictionary definition the gloss of {} or of {}?"
TWEET = "Is the sentiment of this tweet {} or {}?"
FORTUNE = "Is this fortune-cookie quotation about {} or about {}?"
NOUN = {"animal": "an animal", "plant": "a plant", "person": "a person", "artifact": "a man-made object",
        "food": "food or drink", "substance": "a substance or material", "group": "a group of people or things",
        "location": "a place", "time": "a time period", "event": "an event", "act": "an action or activity",
        "feeling": "a feeling or emotion", "cognition": "a thought or idea", "body": "a part of the body",
        "communication": "language or communication", "quantity": "a quantity or unit of measure"}
PART = {"noun": "a noun", "verb": "a verb", "adj": "an adjective", "adv": "an adverb"}


@dataclass(frozen=True)
class ZooTask:
    """One zoo task: source data, the source labels it keeps (in label order), its description and split."""

    name: str
    source: str
    labels: tuple[str, ...]
    description: str
    split: str = "expert"  # "expert" (its adapter feeds the generators) or "heldout" (kept apart)

    def load(self, max_train: int, max_eval: int, seed: int = 0) -> Task:
        """The task's examples (labels renumbered 0..k-1), at most max_train / max_eval per split, stratified."""
        full = carve(self.source, self.labels)
        pick = lambda rows, k: subsample(rows, k, seed, "label")  # noqa: E731
        return Task("classification", pick(full.train, max_train), pick(full.validation, max_eval),
                    pick(full.test, max_eval), full.label_names, self.name)


def carve(source: str, labels: tuple[str, ...] = ()) -> Task:
    """Bundled task ``source`` restricted to the examples of ``labels`` (source label names), relabelled
    0..len(labels)-1 in that order and named by their last dotted part; every label when ``labels`` is empty."""
    from ..data.fortunes import fortunes
    from ..data.task import load_task

    task = fortunes(tuple(sorted(labels))) if source == "fortunes" and labels else load_task(source)
    if not labels:
        return task
    missing = [name for name in labels if name not in task.label_names]
    if missing:
        raise KeyError(f"task {source!r} has no label {', '.join(map(repr, missing))}; "
                       f"its labels: {', '.join(task.label_names)}")
    index = {task.label_names.index(name): new for new, name in enumerate(labels)}
    keep = lambda rows: [{"text": r["text"], "label": index[r["label"]]} for r in rows if r["label"] in index]  # noqa: E731
    return Task(task.kind, keep(task.train), keep(task.validation), keep(task.test),
                tuple(name.split(".")[-1] for name in labels), task.source)


def _noun(a: str, b: str, split: str = "expert") -> ZooTask:
    return ZooTask(f"wordnet-{a}-{b}", "wordnet-category", (f"noun.{a}", f"noun.{b}"),
                   DEFINITION.format(NOUN[a], NOUN[b]), split)


def _pos(a: str, b: str, split: str = "expert") -> ZooTask:
    return ZooTask(f"pos-{a}-{b}", "wordnet-pos", (a, b), POS.format(PART[a], PART[b]), split)


def _tweet(a: str, b: str, split: str = "expert") -> ZooTask:
    return ZooTask(f"tweets-{a}-{b}", "tweets", (a, b), TWEET.format(a, b), split)


def _fortune(a: str, b: str, split: str = "expert") -> ZooTask:
    return ZooTask(f"fortunes-{a}-{b}", "fortunes", (a, b), FORTUNE.format(a, b), split)


TASKS: tuple[ZooTask, ...] = (
    *(_noun(a, b) for a, b in (
        ("animal", "person"), ("animal", "artifact"), ("plant", "food"), ("plant", "substance"),
        ("food", "substance"), ("person", "group"), ("location", "group"), ("time", "event"), ("act", "event"),
        ("feeling", "cognition"), ("body", "animal"), ("communication", "cognition"), ("location", "artifact"),
        ("quantity", "time"))),
    *(_pos(a, b) for a, b in (("noun", "verb"), ("noun", "adj"), ("verb", "adj"), ("verb", "adv"), ("adj", "adv"))),
    _tweet("negative", "positive"), _tweet("neutral", "positive"),
    *(_fortune(a, b) for a, b in (("computers", "politics"), ("love", "food"), ("law", "politics"),
                                  ("science", "education"), ("sports", "food"), ("linux", "literature"))),
    # held out: never shown to the generators
    _noun("animal", "plant", "heldout"), _noun("body", "feeling", "heldout"), _noun("location", "time", "heldout"),
    _noun("person", "artifact", "heldout"), _pos("noun", "adv", "heldout"), _tweet("negative", "neutral", "heldout"),
    _fortune("computers", "love", "heldout"), _fortune("science", "sports", "heldout"),
)
# The causal-LM zoo: a subset, answered as text ("<text> => <label>")
CAUSAL_TASKS: tuple[str, ...] = (
    "wordnet-animal-person", "wordnet-plant-food", "pos-noun-verb", "pos-adj-adv", "tweets-negative-positive",
    "fortunes-computers-politics", "wordnet-animal-plant", "tweets-negative-neutral",
)


def by_name(name: str) -> ZooTask:
    """The zoo task called ``name``."""
    for task in TASKS:
        if task.name == name:
            return task
    raise KeyError(f"no zoo task {name!r}; zoo tasks: {', '.join(t.name for t in TASKS)}")


def as_causal(task: Task) -> Task:
    """The same examples as prompt / completion pairs: "<text> =>" then " <label name>"."""
    from ..data.chat import as_causal as convert

    return convert(task, template="{text} =>")
