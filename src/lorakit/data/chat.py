"""Chat examples for causal-LM instruction tuning: ``messages`` records rendered with the tokenizer's chat template.

A record ``{"messages": [{"role", "content"}, ...]}`` ending in an assistant turn becomes a prompt (every turn
before it, plus the template's generation prompt) and a completion (the assistant turn as the template renders it,
its end-of-turn tokens included), so the loss covers the answer only. The split is taken on token ids: the
template must render the prompt as a prefix of the whole conversation, else the file is refused naming the record.
Bundled classification tasks become causal tasks too (``as_causal``): the text as prompt, the label name as answer.
"""
from __future__ import annotations

ROLES = ("system", "developer", "user", "assistant")


def check_messages(record: dict, where: str, index: int) -> list[dict]:
    """The record's messages, or ValueError naming the record and what is wrong."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: record {index} has no 'messages' list; chat records look like "
                         '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"{where}: record {index}: each message needs a role in {ROLES} and string content; "
                             f"found {turn!r:.120}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: record {index}: the last message must be the assistant's answer (the training "
                         f"target); found role {messages[-1]['role']!r}")
    return [{"role": t["role"], "content": t["content"]} for t in messages]


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def render(tokenizer, messages: list[dict], index: int = 0) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one conversation under the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; use prompt/completion records, or set "
                         "tokenizer.chat_template")
    prompt = _ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    if full[: len(prompt)] != prompt:
        raise ValueError(f"record {index}: the chat template does not render the prompt as a prefix of the whole "
                         "conversation, so the answer's tokens cannot be told apart")
    return prompt, full[len(prompt):]


def as_causal(task, template: str = "{text}\nAnswer:"):
    """A classification Task as prompt/completion: the prompt from ``template``, the completion ' <label name>'."""
    from .task import Task

    if task.kind != "classification":
        raise ValueError(f"as_causal takes a classification task, not {task.kind!r}")
    convert = lambda rows: [{"prompt": template.format(text=r["text"]),  # noqa: E731
                             "completion": " " + task.label_names[r["label"]]} for r in rows]
    return Task("causal_lm", convert(task.train), convert(task.validation), convert(task.test), None, task.source)
