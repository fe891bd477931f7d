"""`MetricsLog`: the run's history as JSON lines in `<output_dir>/metrics.jsonl`, and the progress bar.

Only the main process writes or draws. On resume the file is rewritten from the checkpoint's history, so
steps logged after that checkpoint by an interrupted run do not appear twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Collects history records, appends them to metrics.jsonl and updates a tqdm bar."""

    def __init__(
        self, output_dir: str | None, *, main: bool, total: int, done: int, progress: bool, history: list[dict]
    ):
        self.history = list(history)
        self.path = Path(output_dir) / METRICS_FILE if output_dir and main else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, self.path)
        self.bar = tqdm(total=total, initial=done, desc="train", disable=not (progress and main), dynamic_ncols=True)

    def record(self, entry: dict) -> None:
        """Add one record (a dict with at least `step`) to the history and the file."""
        self.history.append(entry)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        shown = {k: f"{v:.4g}" for k, v in entry.items() if k in ("loss", "eval_loss", "eval_accuracy")}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        """One optimiser step done."""
        self.bar.update(1)

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()
