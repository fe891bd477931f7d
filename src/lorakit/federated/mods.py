"""The ClientApp's Flower mods, chosen per run: client-side DP clipping and SecAgg+ masking.

``lorakit_mods`` is the one mod on lorakit's ClientApp. It reads the run config and passes each message through
Flower's own mods: ``fixedclipping_mod`` (``dp = "client-fixed"``) or ``adaptiveclipping_mod``
(``"client-adaptive"``), which clip the reply's update (reply minus the global adapter received) to the norm
the server's ``DifferentialPrivacyClientSide*`` wrapper sends; and ``secaggplus_mod`` (``secagg = true``), which
answers the SecAgg+ stages and sends the adapter only masked and quantised. With both, the clipping runs inside
the masking: the update is clipped first, then masked (Flower's order for client-side DP with SecAgg+).
Flower's SecAgg+ mod reads the reply in the legacy FitRes layout, so ``as_fitres`` moves lorakit's reply into it
(weight: the example count, or 1 under DP); before that the client refuses (an error reply, which SecAgg+
treats as a dropout) an adapter with NaN/inf values or values outside the quantisation range, which masking
would otherwise hide from the server's checks.
"""
from __future__ import annotations

import functools

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

DP_MODS = {"client-fixed": fixedclipping_mod, "client-adaptive": adaptiveclipping_mod}


def as_fitres(call_next, limit: float, unit_weight: bool = False):
    """Wrap ``call_next`` so that its reply's adapter is in the legacy FitRes records SecAgg+ reads (weighted by
    its example count, or 1 with ``unit_weight``); values beyond +-``limit`` (SecAgg+'s clipping range, which
    would clip them silently) are refused. The SecAgg+ configs are kept from the inner mods and app."""

    def inner(msg: Message, ctxt: Context) -> Message:
        secure = msg.content.get(RECORD_KEY_CONFIGS)  # the clipping mod wants one ConfigRecord: set it aside
        if secure is not None:
            del msg.content[RECORD_KEY_CONFIGS]
        try:
            reply = call_next(msg, ctxt)
        finally:
            if secure is not None:
                msg.content[RECORD_KEY_CONFIGS] = secure
        if reply.has_error():
            return reply
        content = reply.content
        arrays = content.array_records.pop("arrays")
        for key, array in arrays.items():
            values = array.numpy()
            if not np.isfinite(values).all():
                raise ValueError(f"secure aggregation: '{key}' has NaN/inf values; the update is not sent")
            if float(np.abs(values).max(initial=0.0)) > limit:
                raise ValueError(f"secure aggregation: '{key}' has values beyond the quantisation range +-{limit:g}; "
                                 "raise secagg-clip-range")
        content["fitres.parameters"] = arrays
        weight = 1 if unit_weight else int(content["metrics"]["num-examples"])
        content["fitres.num_examples"] = MetricRecord({"num_examples": weight})
        content["fitres.metrics"] = ConfigRecord({})
        content["fitres.status"] = ConfigRecord({"code": 0, "message": ""})
        return reply

    return inner


def lorakit_mods(msg: Message, ctxt: Context, call_next) -> Message:
    """Apply the run's client-side DP clipping and SecAgg+ mods around the ClientApp."""
    config = ctxt.run_config
    if msg.metadata.message_type != MessageType.TRAIN:  # e.g. personalise: nothing is clipped or aggregated
        return call_next(msg, ctxt)
    chain = call_next
    dp_mod = DP_MODS.get(str(config.get("dp", "")))
    if dp_mod is not None:
        chain = functools.partial(dp_mod, call_next=chain)
    if bool(config.get("secagg", False)):
        limit = float(config.get("secagg-clip-range", 8.0))
        chain = functools.partial(secaggplus_mod, call_next=as_fitres(chain, limit, unit_weight=dp_mod is not None))
    return chain(msg, ctxt)
