"""The weight-sharing super-adapter of ``lorakit search-ensemble``: K LoRA paths of rank r_max on every searched
module, one head per path, trained one-shot so that any ensemble of the space is scored by slicing.

Each training step draws an ensemble from the space (a split, and per member a rank b and a module subset, DyLoRA-
style rank sampling with random module subsets) and sums the members' cross-entropy losses; member k runs path 0
on the searched blocks below the split and its own path k above, at rank b: h = W x + (alpha / b) B[:, :b] A[:b] x
(DyLoRA's scale, card 8). Unlike DyLoRA's released recipe, all of A[:b] and B[:, :b] train (its non-frozen mode),
as weight-sharing supernets train every sub-network they sample. Only blocks at or above the first searched block
run per step: the base below it is computed once per example (``cascade.captured``) and replayed.

A member's adapter exports as a plain LoRA state (rank b per module through ``rank_pattern``, lora_alpha = alpha,
so scale alpha / b as in the supernet) with its head as ``modules_to_save``: its PEFT directory loads anywhere.
"""
from __future__ import annotations

import math
import random
import re
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import LoRAConfig
from ..core.state import AdapterState
from ..serve.cascade import captured, replayed
from ..train.schedules.lisa import find_layers
from .space import Ensemble, Member, Space


class _Enough(Exception):
    """Stops a forward once the prefix is computed."""


class SuperLoRALinear(nn.Module):
    """K LoRA paths of rank r_max on one linear layer; ``active = (path, rank)`` or None picks what runs."""

    def __init__(self, base_layer: nn.Linear, paths: int, r_max: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base_layer, self.alpha, self.active = base_layer, alpha, None
        a = torch.empty(paths, r_max, base_layer.in_features)
        bound = 1 / math.sqrt(base_layer.in_features)  # kaiming_uniform(a=sqrt(5)), as LoRA's A
        self.lora_A = nn.Parameter(a.uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(paths, base_layer.out_features, r_max))

    def factors(self, path: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[path, :rank], self.lora_B[path, :, :rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None:
            return y
        a, b = self.factors(*self.active)
        return y + F.linear(F.linear(x, a), b) * (self.alpha / self.active[1])


class _Heads(nn.Module):
    """One classification head per path; ``active`` picks the one that runs."""

    def __init__(self, head: nn.Linear, paths: int, generator: torch.Generator):
        super().__init__()
        self.heads = nn.ModuleList()
        for _ in range(paths):
            h = nn.Linear(head.in_features, head.out_features)
            with torch.no_grad():
                h.weight.normal_(0, 0.02, generator=generator)
                h.bias.zero_()
            self.heads.append(h)
        self.active = 0

    def forward(self, x):
        return self.heads[self.active](x)


class SuperAdapter:
    """The super-adapter on a sequence classifier: searched blocks are the top ``space.layers`` blocks."""

    def __init__(self, model: nn.Module, space: Space, r_max: int, alpha: float, seed: int = 0):
        self.model, self.space, self.alpha = model, space, alpha
        self.blocks_path, self.blocks = find_layers(model)
        self.first = len(self.blocks) - space.layers
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: list[dict[str, tuple[str, SuperLoRALinear]]] = []
        kinds = [k for k, _ in space.sizes]
        for j in range(space.layers):
            block_path = f"{self.blocks_path}.{self.first + j}"
            found = {}
            for path, module in list(model.named_modules()):
                kind = next((k for k in kinds if path.startswith(block_path + ".") and re.search(rf"(^|\.){re.escape(k)}$", path)), None)
                if kind is not None and isinstance(module, nn.Linear):
                    wrapped = SuperLoRALinear(module, space.k, r_max, alpha, g)
                    parent, _, child = path.rpartition(".")
                    setattr(model.get_submodule(parent), child, wrapped)
                    found[kind] = (path, wrapped)
            self.layers.append(found)
        self.head_name = "classifier" if hasattr(model, "classifier") else "score"
        self.heads = _Heads(getattr(model, self.head_name), space.k, g)
        setattr(model, self.head_name, self.heads)

    def trainable(self) -> list[nn.Parameter]:
        params = [t for layer in self.layers for _, m in layer.values() for t in (m.lora_A, m.lora_B)]
        return params + list(self.heads.parameters())

    def plan(self, e: Ensemble, k: int) -> list[tuple[int, Member]]:
        """(path, member genes) on each searched block for member ``k``."""
        return [(0, e.members[0]) if j < e.split else (k, e.members[k]) for j in range(self.space.layers)]

    def configure(self, plan: list[tuple[int, Member]], head: int) -> None:
        for (path, member), layer in zip(plan, self.layers):
            for kind, (_, m) in layer.items():
                m.active = (path, member.rank) if kind in member.modules else None
        self.heads.active = head

    def logits(self, inputs: dict, prefix, plan, head: int, start: int = 0, keep: Optional[list] = None) -> torch.Tensor:
        """Logits of one member from the hidden states entering searched block ``start``; ``keep`` receives the
        states leaving that block."""
        self.configure(plan, head)
        n = self.first + start
        with replayed(self.blocks, n, prefix), captured(self.blocks, n + 1, keep):
            return self.model(**inputs).logits

    def prefix(self, inputs: dict) -> torch.Tensor:
        """The base's hidden states entering the first searched block (no adapter runs below it)."""
        for layer in self.layers:
            for _, m in layer.values():
                m.active = None
        if not self.first:
            return None
        out: list = []

        def stop(module, args, output):  # nothing above the first searched block needs to run
            out.append(output)
            raise _Enough

        hook = self.blocks[self.first - 1].register_forward_hook(stop)
        try:
            with torch.no_grad():
                self.model(**inputs)
        except _Enough:
            pass
        finally:
            hook.remove()
        return out[0]

    def train(self, data: dict, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
        """One-shot training on ``data`` (input_ids, attention_mask, labels, prefix); returns the loss per step."""
        rng = random.Random(seed)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.trainable(), lr=lr, weight_decay=0.0)
        self.model.train()
        losses = []
        n = len(data["labels"])
        for _ in range(steps):
            rows = torch.randint(0, n, (batch_size,), generator=g)
            e = self.space.sample(rng)
            inputs = {"input_ids": data["input_ids"][rows], "attention_mask": data["attention_mask"][rows]}
            prefix = data["prefix"][rows] if data["prefix"] is not None else None
            loss = sum(F.cross_entropy(self.logits(inputs, prefix, self.plan(e, k), k), data["labels"][rows])
                       for k in range(self.space.k))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) / self.space.k)
        self.model.eval()
        return losses

    def export(self, e: Ensemble, k: int, base_model: Optional[str] = None) -> AdapterState:
        """Member ``k`` of ``e`` as a plain LoRA state (shared blocks hold path 0's tensors) with its head."""
        tensors, ranks = {}, {}
        for (path, member), layer in zip(self.plan(e, k), self.layers):
            for kind in member.modules:
                name, m = layer[kind]
                a, b = m.factors(path, member.rank)
                tensors[name] = {"lora_A.weight": a.detach().clone(), "lora_B.weight": b.detach().clone()}
                ranks[name] = member.rank
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        config = LoRAConfig(r=r, lora_alpha=self.alpha, target_modules=sorted(tensors), task_type="SEQ_CLS",
                            rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
                            modules_to_save=[self.head_name], base_model_name_or_path=base_model)
        head = {n: t.detach().clone() for n, t in self.heads.heads[k].state_dict().items()}
        return AdapterState(config, tensors, {self.head_name: head})


class Evaluator:
    """Members' class probabilities on one fixed data split, memoised; the hidden states leaving a searched block
    are kept per chain of (path, genes) below it, so members that share their low blocks compute them once."""

    def __init__(self, sup: SuperAdapter, data: dict, batch_size: int = 64, keep: int = 48):
        self.sup, self.data, self.batch_size, self.keep = sup, data, batch_size, keep
        self.probs: dict = {}
        self.hidden: OrderedDict = OrderedDict()

    @torch.no_grad()
    def member(self, plan: list[tuple[int, Member]], head: int) -> torch.Tensor:
        """[examples, classes] probabilities of the member running ``plan`` with head ``head``."""
        key = (tuple(plan), head)
        if key in self.probs:
            return self.probs[key]
        start, value = 0, self.data["prefix"]
        for j in range(len(plan) - 1, 0, -1):
            if tuple(plan[:j]) in self.hidden:
                start, value = j, self.hidden[tuple(plan[:j])]
                self.hidden.move_to_end(tuple(plan[:j]))
                break
        cache = start + 1 < len(plan)
        out, kept = [], []
        n = len(self.data["labels"])
        for i in range(0, n, self.batch_size):
            rows = slice(i, i + self.batch_size)
            inputs = {"input_ids": self.data["input_ids"][rows], "attention_mask": self.data["attention_mask"][rows]}
            prefix = value[rows] if value is not None else None
            out.append(self.sup.logits(inputs, prefix, plan, head, start, kept if cache else None))
        if cache:
            self.hidden[tuple(plan[:start + 1])] = torch.cat(kept)
            while len(self.hidden) > self.keep:
                self.hidden.popitem(last=False)
        self.probs[key] = torch.cat(out).to(torch.float64).softmax(-1)
        return self.probs[key]

    def ensemble(self, e: Ensemble) -> torch.Tensor:
        """[members, examples, classes] probabilities of the ensemble's members."""
        return torch.stack([self.member(self.sup.plan(e, k), k) for k in range(self.sup.space.k)])

    def score(self, e: Ensemble) -> tuple[float, float]:
        """(accuracy of the averaged probabilities, mean pairwise disagreement of the members)."""
        probs = self.ensemble(e)
        labels = self.data["labels"]
        acc = float((probs.mean(0).argmax(-1) == labels).double().mean())
        preds = probs.argmax(-1)
        pairs = [(a, b) for a in range(len(preds)) for b in range(a + 1, len(preds))]
        div = sum(float((preds[a] != preds[b]).double().mean()) for a, b in pairs) / max(len(pairs), 1)
        return acc, div

    def single(self, m: Member) -> float:
        """Accuracy of one adapter ``m`` on every searched block (path 0, head 0)."""
        probs = self.member([(0, m)] * self.sup.space.layers, 0)
        return float((probs.argmax(-1) == self.data["labels"]).double().mean())
