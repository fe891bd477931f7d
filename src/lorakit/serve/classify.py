"""``POST /v1/classifications``: classifier models (early-exit cascades over adapters, ``cascade.py``) served by name
beside the generating model. Body ``{"model": NAME, "input": TEXT | [TEXT, ...]}``; each answer carries its label,
class probabilities, confidence, and how many cascade stages and member forwards it took."""
from __future__ import annotations

import time
import uuid
from typing import Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.concurrency import run_in_threadpool

from .errors import APIError
from .schema import check_text

MAX_INPUTS = 256


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    input: Union[StrictStr, list[StrictStr]] = Field(...)


def add_routes(app, classifiers: dict, max_prompt_bytes: int) -> None:
    """Add the classification route for ``classifiers`` (name -> ``AdapterCascade``) to the FastAPI ``app``."""

    @app.post("/v1/classifications")
    async def classify(body: ClassifyBody):
        cascade = classifiers.get(body.model)
        if cascade is None:
            raise APIError(404, f"the model '{body.model}' is not a classifier; classifiers here: "
                                f"{', '.join(sorted(classifiers)) or 'none'}", "model")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > MAX_INPUTS:
            raise APIError(400, f"send 1 to {MAX_INPUTS} inputs, found {len(texts)}", "input")
        for text in texts:
            check_text(text, "input")
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size > max_prompt_bytes:
            raise APIError(400, f"the input is {size:,} bytes; this server accepts at most {max_prompt_bytes:,}", "input")
        answers = await run_in_threadpool(cascade.classify, texts)
        return {"id": "clf-" + uuid.uuid4().hex[:24], "object": "list", "created": int(time.time()), "model": body.model,
                "data": [{"index": i, "object": "classification", **a} for i, a in enumerate(answers)],
                "usage": {"member_forwards": sum(a["member_forwards"] for a in answers)}}
