"""The federated experiment both Flower apps (and the benchmark) build from one run config.

``Settings`` is the run config (Flower's ``[tool.flwr.app.config]``, kebab-case keys); ``Experiment`` turns it
into a base model, adapter configs, client shards (Dirichlet label skew), local training and evaluation.
Tasks: ``tweets`` (the packaged MiniLM on the bundled three-class tweet sentiment, ``lorakit.zoo`` and
``lorakit.data``), ``toy`` (a tiny seeded classifier on synthetic token sequences, for tests) and ``chat``
(instruction tuning of a causal LM, ``chat_task``; its defaults are ``tiny-llama`` and ``q_proj,v_proj``). Local
training is ``lorakit.train.fit`` and evaluation ``lorakit.train.evaluate`` (plus generation for ``chat``).
Every party derives the same model, adapter init and split from the seed, so only adapter tensors travel.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..core.apply import adapters, apply
from ..core.config import LoRAConfig
from ..data.encode import collate
from ..train import evaluate, fit
from .aggregation import STRATEGIES
from .dp import check_options as check_dp
from .personal import check_strategy as check_personal
from .secagg import check_options as check_secagg
from .optimisers import check_options, proximal
from .partition import dirichlet_split


@dataclass(frozen=True)
class Settings:
    """The run config with its defaults: the bundled experiment (tweets over 10 clients, sized for a CPU)."""

    task: str = "tweets"  # "tweets" | "toy" | "chat"
    model: str = "minilm"  # for task chat: a causal LM (default tiny-llama)
    data: str = ""  # task chat: a chat JSONL file or directory (default: the bundled tweets as instructions)
    strategy: str = "fedit"
    num_rounds: int = 20
    num_clients: int = 10
    dirichlet_alpha: float = 1.0
    local_steps: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    rank: int = 8
    lora_alpha: float = 16.0
    client_ranks: str = ""  # e.g. "4,8,16": client k trains rank client_ranks[k % 3]; empty: all use `rank`
    targets: str = "query,value"
    max_train: int = 2000
    max_eval: int = 200
    max_length: int = 32
    seed: int = 0
    min_replies: int = 2  # a round with fewer accepted updates keeps the previous global adapter
    fraction_train: float = 1.0
    eval_every: int = 2
    reply_timeout: float = 600.0
    out_dir: str = ""  # the server writes history.json here
    checkpoint_dir: str = ""  # the server checkpoints here after each round and resumes from it
    server_opt: str = ""  # "adam" | "yogi" | "adagrad": adaptive server step on the aggregate (optimisers.py)
    server_lr: float = 1e-2
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    proximal_mu: float = 0.0  # FedProx: mu/2 ||w - w_global||^2 added to each client's loss
    dp: str = ""  # "server-fixed" | "server-adaptive" | "client-fixed" | "client-adaptive": Flower's DP wrapper (dp.py)
    dp_noise: float = 0.0  # the noise multiplier z (noise std z * clip / sampled nodes)
    dp_clip: float = 1.0  # the clipping norm C (the initial one for server-adaptive)
    dp_delta: float = 1e-5  # the delta at which the summary reports epsilon
    secagg: bool = False  # Flower's SecAgg+: the server sees only the weighted sum of the masked adapters (secagg.py)
    secagg_clip_range: float = 8.0  # SecAgg+ quantises values in [-range, range]; clients refuse values beyond it
    personal: str = ""  # FedPer: module names whose adapter (or saved module) stays on each client (personal.py)
    personal_dir: str = ""  # where each client writes its personalised adapter (client-<k>/) after the last round
    gen_examples: int = 32  # task chat: held-out records answered greedily for the generation metric

    def __post_init__(self):
        if self.task == "chat":  # the classification defaults name an encoder and its modules
            if self.model == "minilm":
                object.__setattr__(self, "model", "tiny-llama")
            if self.targets == "query,value":
                object.__setattr__(self, "targets", "q_proj,v_proj")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet-alpha must be > 0 (smaller: more label skew), found {self.dirichlet_alpha}")
        if not self.proximal_mu >= 0:
            raise ValueError(f"proximal-mu must be >= 0, found {self.proximal_mu}")
        if self.dp:
            check_dp(self)
        if self.secagg:
            check_secagg(self)
        if self.personal:
            check_personal(self)
        if self.server_opt:
            check_options(self.server_opt, self.server_lr, self.server_beta1, self.server_beta2, self.server_tau)
            if STRATEGIES.get(self.strategy).restart:
                raise ValueError(f"server-opt {self.server_opt!r} does not apply to strategy {self.strategy!r}: it "
                                 "merges a fresh update of a new rank each round, so there is no persistent adapter "
                                 "to move; use fedit, ffa_lora, lora_fair or zero_pad")

    @classmethod
    def from_config(cls, config: Mapping) -> "Settings":
        """Parse a Flower run config (kebab-case keys); unknown keys are an error that lists the known ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = ", ".join(sorted(f.replace("_", "-") for f in fields))
                raise ValueError(f"unknown run config key {key!r}; known keys: {known}")
            kind = type(getattr(cls, name))
            if kind is bool and isinstance(value, str):  # "true"/"false" from a command line or a node config
                value = value.strip().lower() in ("1", "true", "yes")
            values[name] = kind(value)
        return cls(**values)

    def to_config(self) -> dict:
        """The kebab-case run config that ``from_config`` reads."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def client_rank(self, partition: int) -> int:
        ranks = [int(r) for r in self.client_ranks.split(",") if r.strip()]
        return ranks[partition % len(ranks)] if ranks else self.rank

    @property
    def max_rank(self) -> int:
        return max(self.client_rank(k) for k in range(self.num_clients))


def stable_seed(*parts) -> int:
    """A 63-bit seed from any values, the same on every machine (no Python hash randomisation)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class ToyClassifier(nn.Module):
    """Frozen random embeddings, mean-pooled, two Linear layers (``query``, ``value``) and a ``classifier``."""

    def __init__(self, vocab: int = 64, dim: int = 32, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids).mean(dim=1)
        logits = self.classifier(torch.tanh(self.value(torch.tanh(self.query(h)))))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def toy_examples(n: int, seed: int, vocab: int = 64, length: int = 12, classes: int = 3) -> list[dict]:
    """Token sequences whose label is the class whose marker tokens occur most (markers: ids < 3 * classes)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    ids = torch.randint(3 * classes, vocab, (n, length), generator=g)
    markers = labels[:, None] * 3 + torch.randint(0, 3, (n, 4), generator=g)
    ids[:, :4] = markers
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * length, "labels": int(labels[i])} for i in range(n)]


TASKS = ("tweets", "toy", "chat")


@functools.lru_cache(maxsize=2)
def _task(task: str, model: str, data: str, seed: int, max_train: int, max_eval: int, max_length: int):
    """The base model, train / test features, number of classes, padding id (and for chat: tokenizer, test
    records, categories), built once per process."""
    if task == "chat":
        from . import chat_task

        return chat_task.load(model, data, seed, max_train, max_eval, max_length)
    if task == "toy":
        torch.manual_seed(seed)
        train = toy_examples(max_train, seed)
        test = toy_examples(max_eval, seed + 1)
        return SimpleNamespace(base=ToyClassifier(), train=train, test=test, num_classes=3, pad_id=0, tokenizer=None,
                               categories=[f["labels"] for f in train], test_categories=[f["labels"] for f in test])
    if task != "tweets":
        raise ValueError(f"unknown task {task!r}; the federated experiment knows {', '.join(TASKS)}")
    from .. import zoo
    from ..data import load_task

    loaded = load_task("tweets", max_train=max_train, max_eval=max_eval, seed=seed)
    net, tokenizer = zoo.load(model, task="seq_cls", num_labels=loaded.num_labels, seed=seed)
    encoded = loaded.encode(tokenizer, max_length=max_length)
    train, test = list(encoded["train"]), list(encoded["test"])
    return SimpleNamespace(base=net, train=train, test=test, num_classes=loaded.num_labels, tokenizer=None,
                           pad_id=encoded["train"].pad_token_id, categories=[f["labels"] for f in train],
                           test_categories=[f["labels"] for f in test])


class Experiment:
    """Model, data, adapters, local training and evaluation for one ``Settings``."""

    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.rule = STRATEGIES.get(s.strategy)
        self.loaded = t = _task(s.task, s.model, s.data, s.seed, s.max_train, s.max_eval, s.max_length)
        self._base, self.train, self.test, self.num_classes, self.pad_id = t.base, t.train, t.test, t.num_classes, t.pad_id
        self.categories = t.categories
        self.shards = dirichlet_split(t.categories, s.num_clients, s.dirichlet_alpha, s.seed, min_size=2)

    @functools.cached_property
    def base_id(self) -> str:
        """A fingerprint of the base model (parameter names, shapes and values): clients must train on this base."""
        h = hashlib.sha256()
        for name, t in self._base.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def base_model(self) -> nn.Module:
        """A fresh copy of the frozen base model."""
        return copy.deepcopy(self._base)

    def adapter_config(self, rank: int | None = None) -> LoRAConfig:
        s = self.settings
        r = rank or s.rank
        return LoRAConfig(r=r, lora_alpha=s.lora_alpha * r / s.rank, target_modules=s.targets.split(","),
                          modules_to_save=None if s.task == "chat" else ["classifier"])

    def add_adapter(self, model: nn.Module, rank: int, init_seed: int) -> nn.Module:
        """Apply a fresh adapter of ``rank``; with a shared-A strategy A is the shared seeded init, frozen."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            apply(model, self.adapter_config(rank))
        if "lora_A.weight" in self.rule.shared:
            share_a(model, self.settings.seed, self.settings.max_rank)
        return model

    def fresh_state(self):
        """The adapter every party starts from (max rank, the run's seed), as an AdapterState."""
        from ..core.state import AdapterState

        return AdapterState.from_model(self.add_adapter(self.base_model(), self.settings.max_rank, self.settings.seed))

    def train_local(self, model: nn.Module, partition: int, server_round: int) -> tuple[int, float]:
        """``local_steps`` AdamW steps (constant learning rate) on the client's shard with ``lorakit.train.fit``,
        with FedProx's proximal term when ``proximal-mu`` > 0; returns (examples in the shard, mean training loss)."""
        s, shard = self.settings, self.shards[partition]
        with proximal(model, s.proximal_mu):
            result = self._fit(model, shard, server_round, partition)
        losses = [h["loss"] for h in result.history if "loss" in h]
        model.eval()
        return len(shard), sum(losses) / max(1, len(losses))

    def _fit(self, model: nn.Module, shard: list[int], server_round: int, partition: int):
        s = self.settings
        return fit(model, [self.train[i] for i in shard], lr=s.lr, batch_size=s.batch_size, max_steps=s.local_steps,
                   schedule="constant", warmup_steps=0, seed=stable_seed(s.seed, "batches", server_round, partition) % 2**31,
                   log_every=1, progress=False, collate_fn=self.collate)

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_id)

    def evaluate(self, model: nn.Module, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and mean loss on the test examples (chat: answer loss, and the generation metric)."""
        out = evaluate(model, self.test, batch_size=batch_size, collate_fn=self.collate)
        if self.settings.task == "chat":
            from .chat_task import generation

            out.update(generation(model, self.loaded.tokenizer, self.loaded.test_records, self.settings.gen_examples))
        return out

    def client_score(self, model: nn.Module, partition: int) -> float:
        """Held-out accuracy (chat: exact match) per category, weighted by the category's share of the shard."""
        t, s = self.loaded, self.settings
        mix = collections.Counter(self.categories[i] for i in self.shards[partition])
        score = total = 0.0
        for category, n in sorted(mix.items()):
            idx = [i for i, c in enumerate(t.test_categories) if c == category]
            if not idx:
                continue
            if s.task == "chat":
                from .chat_task import generation

                acc = generation(model, t.tokenizer, [t.test_records[i] for i in idx], s.gen_examples)["accuracy"]
            else:
                acc = evaluate(model, [self.test[i] for i in idx], batch_size=64, collate_fn=self.collate)["accuracy"]
            score, total = score + n * acc, total + n
        return score / total if total else float("nan")


def share_a(model: nn.Module, seed: int, max_rank: int) -> None:
    """Set every lora_A to the leading rows of one seeded [max_rank, in] init per module, and freeze it.

    Drawn per module path (not from the global RNG), so clients of any rank hold prefixes of the same A.
    """
    for path, layer in adapters(model).items():
        a = layer.lora_A.weight
        g = torch.Generator().manual_seed(stable_seed(seed, "shared-A", path))
        bound = 1 / a.shape[1] ** 0.5  # LoRA's kaiming_uniform(a=sqrt(5)) bound for fan_in = in_features
        full = (torch.rand(max_rank, a.shape[1], generator=g, dtype=torch.float64) * 2 - 1) * bound
        with torch.no_grad():
            a.copy_(full[: a.shape[0]].to(a.dtype))
        a.requires_grad_(False)
