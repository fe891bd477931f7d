"""The attention probes: processors that compute attention exactly as diffusers' do, with the probabilities explicit.

``Probe`` stands in for ``AttnProcessor``/``AttnProcessor2_0`` (self- and cross-attention) and
``JointAttnProcessor2_0`` (SD3's joint attention) while an ``AttentionComposer`` (attention.py) is bound: it records
the probabilities, adds the composer's self-attention bias to the scores and lets it rewrite a layer's image output.
``check_attention`` refuses a denoiser whose attention the probe would not reproduce.
"""
from __future__ import annotations

from typing import Optional

import torch

SUPPORTED = ("AttnProcessor", "AttnProcessor2_0", "JointAttnProcessor2_0")  # softmax(QK^T / sqrt d) V, as the probe


class Probe:
    """An attention processor that records probabilities and lets its composer steer scores and outputs."""

    def __init__(self, owner: "AttentionComposer"):
        self.owner = owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            return self.joint(attn, hidden_states, encoder_hidden_states)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, positions, _ = hidden_states.shape
        cross = encoder_hidden_states is not None
        context = hidden_states if not cross else \
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        grid = self.owner.grid(positions)
        query = heads(attn, attn.to_q(hidden_states), attn.norm_q)
        key, value = heads(attn, attn.to_k(context), attn.norm_k), heads(attn, attn.to_v(context))
        bias = None if cross else self.owner.self_bias(grid, query.device)  # (positions, positions) or None
        if bias is not None:
            attention_mask = bias[None] if attention_mask is None else attention_mask + bias
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, positions, keys)
        self.owner.record(cross, grid, probs.unflatten(0, (batch, -1)))
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        if cross:
            def attend(name):  # this layer's attention output (before to_out) with LoRA ``name`` alone on K and V
                k = heads(attn, project(attn.to_k, context, name), attn.norm_k)
                p = attn.get_attention_scores(query, k, attention_mask)
                v = heads(attn, project(attn.to_v, context, name))
                return attn.batch_to_head_dim(torch.bmm(p, v)), p.unflatten(0, (batch, -1))

            out = self.owner.rewrite(attn, out, grid, attend)
        if len(shape) == 4:
            out = out.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def joint(self, attn, hidden, context):
        """SD3-style joint attention: image and text tokens in one softmax (``JointAttnProcessor2_0``'s maths).

        The cross-attention map recorded is the image-query x text-key block renormalised over the text keys (the
        softmax of those scores alone), the self-attention map the image x image block renormalised likewise; a
        self-attention bias applies to the image x image block."""
        batch, positions, _ = hidden.shape
        grid = self.owner.grid(positions)
        q, k, v = (heads(attn, attn.to_q(hidden), attn.norm_q), heads(attn, attn.to_k(hidden), attn.norm_k),
                   heads(attn, attn.to_v(hidden)))
        cq, ck, cv = (heads(attn, attn.add_q_proj(context), attn.norm_added_q),
                      heads(attn, attn.add_k_proj(context), attn.norm_added_k), heads(attn, attn.add_v_proj(context)))
        query, key, value = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        scores = torch.bmm(query, key.transpose(1, 2)) * attn.scale  # (batch * heads, P + T, P + T)
        bias = self.owner.self_bias(grid, scores.device)
        if bias is not None:
            scores[:, :positions, :positions] += bias
        self.owner.record(False, grid, scores[:, :positions, :positions].softmax(-1).unflatten(0, (batch, -1)))
        self.owner.record(True, grid, scores[:, :positions, positions:].softmax(-1).unflatten(0, (batch, -1)))
        out = attn.batch_to_head_dim(torch.bmm(scores.softmax(-1), value))
        image, text = out[:, :positions], out[:, positions:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        image = attn.to_out[1](attn.to_out[0](image))

        def attend(name):  # image queries over [image keys, text keys and values with LoRA ``name`` alone]
            ck_i = heads(attn, project(attn.add_k_proj, context, name), attn.norm_added_k)
            s = torch.bmm(q, torch.cat([k, ck_i], 1).transpose(1, 2)) * attn.scale
            if bias is not None:
                s[:, :, :positions] += bias
            o = torch.bmm(s.softmax(-1), torch.cat([v, heads(attn, project(attn.add_v_proj, context, name))], 1))
            return attn.batch_to_head_dim(o), s[:, :, positions:].softmax(-1).unflatten(0, (batch, -1))

        return self.owner.rewrite(attn, image, grid, attend), text


def heads(attn, x: torch.Tensor, norm=None) -> torch.Tensor:
    """(batch, tokens, heads * d) -> (batch * heads, tokens, d), then the layer's per-head norm if it has one."""
    x = attn.head_to_batch_dim(x)
    return x if norm is None else norm(x)


def check_attention(denoiser, method: str) -> None:
    """Refuse a denoiser whose attention the probes cannot reproduce exactly, or that has no cross-attention."""
    from diffusers.models.attention_processor import Attention

    modules = dict(denoiser.named_modules())
    processors = getattr(denoiser, "attn_processors", None)
    if processors is None:  # no processor API (DiTTransformer2DModel): look at its attention layers all the same
        processors = {f"{n}.processor": m.processor for n, m in modules.items() if isinstance(m, Attention)}
    crossing = False
    for name, processor in processors.items():
        layer, kind = modules.get(name.rsplit(".processor", 1)[0]), type(processor).__name__
        if not isinstance(layer, Attention):
            raise ValueError(f"{method}: {type(denoiser).__name__}'s attention layer {name!r} is a "
                             f"{type(layer).__name__}, not diffusers' Attention (e.g. Flux's single-stream blocks, "
                             f"where text and image tokens form one sequence); the attention probes cannot read it")
        if kind not in SUPPORTED:
            raise ValueError(f"{method}: attention layer {name!r} uses {kind}, which does not compute "
                             f"softmax(QK^T / sqrt d) V as {', '.join(SUPPORTED)} do; the probes would change the "
                             f"network's output")
        crossing |= layer.is_cross_attention or kind == "JointAttnProcessor2_0"
    if not crossing:
        raise ValueError(f"{method} steers the attention from image to prompt tokens; {type(denoiser).__name__} has "
                         f"no cross-attention or joint text-image attention layer (a class-conditional DiT?)")
    if not hasattr(denoiser, "set_attn_processor"):
        raise ValueError(f"{method}: {type(denoiser).__name__} has no set_attn_processor to install the probes with")


def project(layer, x: torch.Tensor, adapter: Optional[str]) -> torch.Tensor:
    """``layer(x)`` with exactly ``adapter`` (None: none) on its base weights, whichever adapters are active.

    PEFT's LoRA rule, base(x) + B(A(x)) * scaling, with the scaling ``set_adapters`` gave; variants (DoRA) refused."""
    if not hasattr(layer, "lora_A"):
        return layer(x)
    out = layer.base_layer(x)
    if adapter is None or adapter not in layer.lora_A:
        return out
    if adapter in getattr(layer, "lora_variant", {}):
        raise ValueError(f"LoRA {adapter!r} is a LoRA variant (e.g. DoRA); region injection takes plain LoRAs only")
    return out + layer.lora_B[adapter](layer.lora_A[adapter](layer.lora_dropout[adapter](x))) * layer.scaling[adapter]
