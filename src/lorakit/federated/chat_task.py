"""The federated instruction-tuning task (``task = "chat"``), in the manner of FlowerTune: chat records on a causal LM.

Each client fine-tunes a LoRA adapter of a causal LM on its share of chat records (``{"messages": [...]}``,
rendered with the tokenizer's chat template by ``lorakit.data.chat``, loss on the answer only); the server
evaluates the global model by the answer loss on held-out records and by what it generates
(``lorakit.train.generation``: exact match and token F1 of greedy answers; ``accuracy`` is the exact match).
Records come from ``data`` (a chat JSONL file, or a directory with train/test files); without it, the bundled
tweets become instructions ("Sentiment of this tweet: ..." -> "negative" | "neutral" | "positive"). Clients are
split by a Dirichlet skew over each record's ``category`` (else its answer). A tokenizer without a chat template
(the byte tokenizer of the tiny test models) gets ``TEMPLATE``, whose turns end in the end-of-sequence token so
generation stops after the answer. Causal LMs: the zoo's ``tiny-llama`` (tests), ``llama-25m``, ``gemma-270m``.
"""
from __future__ import annotations

from types import SimpleNamespace

TEMPLATE = ("{% for m in messages %}{{ m.role[0] }}:{{ m.content }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")
INSTRUCTION = "Sentiment of this tweet: {text}"
CAUSAL_MODELS = ("tiny-llama", "llama-25m", "gemma-270m", "tiny-gpt2")


def records(data: str, max_train: int, max_eval: int, seed: int):
    """(train, test, number of categories): chat records, each with an integer ``category``."""
    from ..data import load_task

    if data:
        task = load_task(data, "causal_lm", max_train=max_train, max_eval=max_eval, seed=seed)
        if task.train and "messages" not in task.train[0]:
            raise ValueError(f"data {data!r}: the chat task needs chat records ({{\"messages\": [...]}}), "
                             "found prompt/completion records")
        train, test = task.train, task.test
    else:
        task = load_task("tweets", max_train=max_train, max_eval=max_eval, seed=seed)
        chat = lambda r: {"messages": [{"role": "user", "content": INSTRUCTION.format(text=r["text"])},  # noqa: E731
                                       {"role": "assistant", "content": task.label_names[r["label"]]}]}
        train, test = [chat(r) for r in task.train], [chat(r) for r in task.test]
    key = lambda r: str(r.get("category", r["messages"][-1]["content"]))  # noqa: E731
    index = {k: i for i, k in enumerate(sorted({key(r) for r in train}))}
    for r in (*train, *test):
        r["category"] = index.get(key(r), -1)  # -1: a held-out category no client trains on
    return train, test, len(index)


def load(model: str, data: str, seed: int, max_train: int, max_eval: int, max_length: int) -> SimpleNamespace:
    """The base causal LM, its tokenizer, encoded train/test features, the test records and the categories."""
    from .. import zoo
    from ..data.encode import encode, pad_id

    if model in ("minilm", "paraphrase-minilm-l3", "tiny-bert"):
        raise ValueError(f"task 'chat' needs a causal LM, not the encoder {model!r}; use one of {', '.join(CAUSAL_MODELS)}")
    net, tokenizer = zoo.load(model, "causal_lm", seed=seed)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = TEMPLATE
    train, test, classes = records(data, max_train, max_eval, seed)
    strip = lambda rs: [{"messages": r["messages"]} for r in rs]  # noqa: E731
    return SimpleNamespace(
        base=net, tokenizer=tokenizer, pad_id=pad_id(tokenizer), num_classes=classes,
        train=list(encode(strip(train), tokenizer, kind="causal_lm", max_length=max_length)),
        test=list(encode(strip(test), tokenizer, kind="causal_lm", max_length=max_length)),
        test_records=strip(test), categories=[r["category"] for r in train],
        test_categories=[r["category"] for r in test])


def generation(model, tokenizer, test_records: list[dict], count: int, max_new_tokens: int = 12) -> dict[str, float]:
    """Exact match and token F1 of greedy answers to the first ``count`` held-out records."""
    from ..train.generation import generation_metrics

    scores = generation_metrics(model, tokenizer, test_records[:count], max_new_tokens=max_new_tokens)
    return {"exact-match": scores["exact_match"], "token-f1": scores["token_f1"], "accuracy": scores["exact_match"]}
