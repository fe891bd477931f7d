"""Evaluation of a causal LM by what it generates: greedy answers to the prompts, compared with the references.

``generation_metrics(model, tokenizer, examples)`` returns exact match (the answer equals the reference after
stripping whitespace) and token F1 (bag-of-words overlap, as SQuAD scores answers), averaged over examples. Chat
examples are prompted with the tokenizer's chat template (``lorakit.data.chat``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def _f1(answer: str, reference: str) -> float:
    a, r = answer.split(), reference.split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _prompt_and_reference(example: dict, tokenizer, index: int) -> tuple[list[int], str]:
    if "messages" in example:
        from ..data.chat import render

        prompt, completion = render(tokenizer, example["messages"], index)
        return prompt, example["messages"][-1]["content"]
    return tokenizer(example["prompt"])["input_ids"], example["completion"]


@torch.no_grad()
def generation_metrics(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 16) -> dict[str, float]:
    """Exact match and token F1 of greedy answers (one example at a time, no padding effects)."""
    if not examples:
        raise ValueError("generation_metrics got no examples")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    exact = f1 = 0.0
    try:
        for i, example in enumerate(examples):
            prompt, reference = _prompt_and_reference(example, tokenizer, i)
            ids = torch.tensor([prompt], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
            exact += float(answer == reference.strip())
            f1 += _f1(answer, reference.strip())
    finally:
        model.train(was_training)
    return {"exact_match": exact / len(examples), "token_f1": f1 / len(examples)}
