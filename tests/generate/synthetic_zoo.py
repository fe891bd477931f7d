"""A tiny synthetic task zoo for the generate tests: word-category tasks on tiny-bert (byte tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.data import Task
from lorakit.generate.taskzoo import ZooBudget, build_zoo

WORDS = {
    "animal": ["cat", "dog", "horse", "eagle", "shark", "mouse", "tiger", "whale", "otter", "camel", "lion", "crow"],
    "plant": ["oak", "rose", "fern", "tulip", "maple", "cactus", "ivy", "moss", "pine", "lily", "reed", "elm"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "pliers", "axe", "rake", "spade", "file", "vise", "awl"],
    "food": ["bread", "rice", "cheese", "apple", "soup", "pasta", "honey", "bean", "cake", "egg", "fig", "plum"],
    "place": ["paris", "lima", "oslo", "rome", "cairo", "tokyo", "delhi", "quito", "bern", "riga", "kyiv", "baku"],
}
BUDGET = ZooBudget(rank=2, alpha=4.0, steps=8, batch_size=8, lr=5e-2, max_train=24, max_eval=8, max_length=12,
                   snapshots=(3,))


@dataclass(frozen=True)
class WordTask:
    """Is this word an {a} or a {b}?  (two classes of WORDS, templates around the word)."""

    a: str
    b: str
    split: str = "expert"
    source: str = "synthetic"

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def labels(self) -> tuple[str, str]:
        return (self.a, self.b)

    @property
    def description(self) -> str:
        return f"Is this word the name of a {self.a} or of a {self.b}?"

    def load(self, max_train: int, max_eval: int, seed: int = 0) -> Task:
        rows = [{"text": f"the {w} {t}", "label": y} for y, c in enumerate(self.labels) for w in WORDS[c]
                for t in ("here", "there")]
        return Task("classification", rows[::2][:max_train] + rows[1::2][:max_train], rows[1::6], rows[::5],
                    self.labels, self.name)


TASKS = (WordTask("animal", "plant"), WordTask("animal", "tool"), WordTask("plant", "food"),
         WordTask("tool", "place"), WordTask("food", "place"), WordTask("animal", "food", "heldout"))

