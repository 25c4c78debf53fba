"""A self-contained PyTorch LM2 (and RMT) for the weights `python -m lm2_jax.export` writes.

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It implements, line for line, the model lm2-jax trains (its docs/design.md §2, "Memory semantics"):
a Llama-3 decoder run over the input in segments of `segment_len` tokens; the first
`memory_layers` blocks read the memory bank M_s (N x D, float32) with a gated cross-attention
beside self-attention, and write it, chained block to block, once the segment is complete:

    A = softmax(x W_Q (M W_K)ᵀ / sqrt(d_h))  (optionally over the top k slots)   E = concat(A M W_V) W_O
    h = h + SelfAttn(x) + sigmoid(E W_out) ⊙ E
    P = mean_heads(A)ᵀ routed to the slots;  X̄ = P x,  Ē = P E
    W_ℓ = sigmoid(X̄ W_in + b_in) ⊙ tanh(Ē) + sigmoid(Ē W_f + b_f) ⊙ W_{ℓ-1},   M_{s+1} = W_{L_m}

Self-attention is causal inside a segment; only the memory crosses segments. With
`lm2_kind="rmt"` the memory is instead `memory_slots` embeddings read before and written after
each segment (the Recurrent Memory Transformer).

Only torch and the public transformers API are used (no Llama internals, no jax). M_0 is built in
`forward` (a non-persistent buffer would not survive `from_pretrained`'s meta-device loading).
`generate()` works: there is no KV cache, every step re-runs the input so far segment by
segment (the memory is carried across every segment boundary exactly as in training), so a token
costs O(length) rather than O(segment). `forward(..., memory=M)` continues from a memory the
previous call returned (`output.memory`), to stream a long input chunk by chunk; a chunk must then
start at a segment boundary (`position_offset` a multiple of `segment_len`).

Padding: `attention_mask` marks real tokens (1) and padding (0). Rows are aligned to their first
real token before they are cut into segments, so a left-padded row (batched `generate`) is
computed exactly as the same row unpadded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_lm2 import LM2Config

NEG_INF = torch.finfo(torch.float32).min
ROUTE_EPS = 1e-6  # keeps a slot no token attended to finite; it then receives a zero summary
READ_DOC, WRITE_DOC = -1, -2  # RMT's memory tokens: seen by, and seeing, every document of the row


@dataclass
class LM2Output(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None  # the memory after the last segment (B, N, D), float32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * x32.to(x.dtype)


def rope_inv_freq(config) -> torch.Tensor:
    """Inverse RoPE frequencies (head_dim/2,) float32, with Llama-3's long-context rescaling."""
    rp, dh = config.rope_parameters, config.head_dim
    inv = 1.0 / (float(rp["rope_theta"]) ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    if rp.get("rope_type", "default") == "llama3":
        factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        orig = float(rp["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (orig / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > orig / lo, inv / factor, torch.where(wavelen < orig / hi, inv, mid))
    elif rp.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters.rope_type={rp['rope_type']!r}: this model knows 'default' and 'llama3'")
    return inv.float()


def apply_rope(x_BSHd, cos_BSd, sin_BSd):
    half = x_BSHd.shape[-1] // 2
    x1, x2 = x_BSHd[..., :half].float(), x_BSHd[..., half:].float()
    cos, sin = cos_BSd[:, :, None], sin_BSd[:, :, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BSHd.dtype)


def attention_mask(doc_BS, shared: bool):
    """(B, S, S): causal, same document, never a padded key (doc 0); `shared` (RMT): memory tokens
    (negative doc ids) see and are seen by every document."""
    S = doc_BS.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_BS.device).tril()
    dq, dk = doc_BS[:, :, None], doc_BS[:, None, :]
    same = dq == dk
    if shared:
        same = same | (dq < 0) | (dk < 0)
    return causal[None] & same & (dk != 0)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, H, K, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.H, self.K, self.dh = H, K, dh
        self.q_proj = nn.Linear(D, H * dh, bias=False)
        self.k_proj = nn.Linear(D, K * dh, bias=False)
        self.v_proj = nn.Linear(D, K * dh, bias=False)
        self.o_proj = nn.Linear(H * dh, D, bias=False)

    def forward(self, x, cos, sin, mask_BSS):
        B, S, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, S, self.H, self.dh), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, S, self.K, self.dh), cos, sin)
        v = self.v_proj(x).view(B, S, self.K, self.dh)
        q = q.view(B, S, self.K, self.H // self.K, self.dh)  # query heads grouped under their KV head
        scores = torch.einsum("bskgx,bukx->bkgsu", q.float(), k.float()) / math.sqrt(self.dh)
        scores = scores.masked_fill(~mask_BSS[:, None, None], NEG_INF)
        probs = scores.softmax(-1).to(v.dtype)
        out = torch.einsum("bkgsu,bukx->bskgx", probs, v).reshape(B, S, self.H * self.dh)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SegmentConv(nn.Module):
    """Causal depthwise convolution over the last `conv_width` tokens of the same document inside
    the segment: out_t = sum_j w_j ⊙ x_{t-j}."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.full((config.conv_width, config.hidden_size), 1.0 / config.conv_width))

    def forward(self, x_BSD, doc_BS):
        S = x_BSD.shape[1]
        out = torch.zeros(x_BSD.shape, dtype=torch.float32, device=x_BSD.device)
        for j in range(self.weight.shape[0]):
            x_j = F.pad(x_BSD, (0, 0, j, 0))[:, :S].float()
            same = F.pad(doc_BS, (j, 0), value=-1)[:, :S] == doc_BS
            out = out + torch.where(same[..., None], x_j * self.weight[j].float(), 0.0)
        return out.to(x_BSD.dtype)


class Memory(nn.Module):
    """One memory block's read (gated, into the residual stream) and write (W_{ℓ-1} -> W_ℓ)."""

    def __init__(self, config):
        super().__init__()
        D, H = config.hidden_size, config.memory_heads
        self.H, self.dh, self.top_k, self.routing = H, D // H, config.memory_top_k, config.memory_routing
        self.q_proj = nn.Linear(D, D, bias=False)
        if config.memory_address == "slots":  # learned keys per slot and head, (H, N, dh)
            self.slot_keys = nn.Parameter(torch.zeros(H, config.memory_slots, D // H))
            self.k_proj = None
        else:
            self.k_proj = nn.Linear(D, D, bias=False)
        self.token_scope = config.memory_read_scope == "token"
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.out_gate = nn.Linear(D, D, bias=False)
        self.delta = config.memory_write_rule == "delta"
        if self.delta:
            self.candidate = nn.Linear(D, D, bias=False)
            self.write_strength = nn.Parameter(torch.zeros(D))
            self.write_bias = nn.Parameter(torch.zeros(1))
        else:
            self.in_gate = nn.Linear(D, D, bias=True)
            self.forget_gate = nn.Linear(D, D, bias=True)
            self.candidate = nn.Linear(D, D, bias=False) if config.memory_write_candidate == "tokens" else None
        self.bank_norm = RMSNorm(D, config.rms_norm_eps) if config.memory_normalize_bank else None

    def forward(self, x_BSD, mem_BND, w_prev_BND, valid_BS):
        B, S, D = x_BSD.shape
        N, dtype = mem_BND.shape[1], x_BSD.dtype
        norm = (lambda m: m) if self.bank_norm is None else self.bank_norm
        bank = norm(mem_BND).to(dtype)
        heads = lambda t, n: t.view(B, n, self.H, self.dh).transpose(1, 2)  # (B, H, n, dh)
        q = heads(self.q_proj(x_BSD), S)
        k = self.slot_keys[None].to(dtype) if self.k_proj is None else heads(self.k_proj(bank), N)
        scores = torch.einsum("bhsx,bhnx->bhsn", q.float(), k.float().expand(B, -1, -1, -1)) / math.sqrt(self.dh)
        if self.top_k:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))  # softmax over the k best
        attn = scores.softmax(-1)  # (B, H, S, N) float32
        out = lambda e_mem: torch.sigmoid(self.out_gate(e_mem).float()).to(dtype) * e_mem

        v32 = valid_BS.float()
        lin = lambda layer, t: F.linear(t, layer.weight.float(), None if layer.bias is None else layer.bias.float())
        if self.delta:  # token by token: M += beta a (v - a M) at the token's read address a
            a, x32 = attn.mean(1), x_BSD.float()
            cand = torch.tanh(lin(self.candidate, x32))
            beta = torch.sigmoid(x32 @ self.write_strength.float() + self.write_bias.float()) * v32
            w, reads = w_prev_BND.float(), []
            for s in range(S):
                if self.token_scope:  # the memory as the tokens before this one left it
                    v_s = heads(self.v_proj(norm(w).to(dtype)), N)
                    reads.append(torch.einsum("bhn,bhnx->bhx", attn[:, :, s].to(dtype), v_s).reshape(B, D))
                err = cand[:, s] - torch.einsum("bn,bnd->bd", a[:, s], w)
                w = w + (beta[:, s, None] * a[:, s])[:, :, None] * err[:, None, :]
            if self.token_scope:
                return out(self.o_proj(torch.stack(reads, 1))), w
        v = heads(self.v_proj(bank), N)
        e_mem = self.o_proj(torch.einsum("bhsn,bhnx->bshx", attn.to(dtype), v).reshape(B, S, D))
        gated = out(e_mem)
        if self.delta:
            return gated, w
        abar = attn.mean(1) * v32[..., None]  # (B, S, N)
        if self.routing == "mass":
            p = abar.transpose(1, 2) / v32.sum(1).clamp(min=1.0)[:, None, None]
        else:
            p = abar.transpose(1, 2) / (abar.sum(1)[..., None] + ROUTE_EPS)
        xbar = torch.einsum("bns,bsd->bnd", p, x_BSD.float())
        ebar = torch.einsum("bns,bsd->bnd", p, e_mem.float())
        g_in = torch.sigmoid(lin(self.in_gate, xbar))
        g_f = torch.sigmoid(lin(self.forget_gate, ebar))
        cand = torch.tanh(ebar) if self.candidate is None else torch.tanh(lin(self.candidate, xbar))
        return gated, g_in * cand + g_f * w_prev_BND


class Block(nn.Module):
    def __init__(self, config, has_memory: bool):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(config)
        self.segment_conv = SegmentConv(config) if config.conv_width else None
        self.memory = Memory(config) if has_memory else None
        self.after_attention = has_memory and config.memory_placement == "after_attention"
        self.memory_layernorm = RMSNorm(D, eps) if self.after_attention else None

    def forward(self, h, w, mem, cos, sin, mask, doc, valid):
        x = self.input_layernorm(h)
        if self.segment_conv is not None:
            x = self.segment_conv(x, doc)
        update = self.self_attn(x, cos, sin, mask)
        if self.memory is not None and not self.after_attention:
            gated, w = self.memory(x, mem, w, valid)
            update = update + gated
        h = h + update
        if self.after_attention:
            gated, w = self.memory(self.memory_layernorm(h), mem, w, valid)
            h = h + gated
        return h + self.mlp(self.post_attention_layernorm(h)), w


class LM2PreTrainedModel(PreTrainedModel):
    config_class = LM2Config
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        # Fresh (untrained) weights only; exports carry every tensor.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class LM2Model(LM2PreTrainedModel):
    def __init__(self, config: LM2Config):
        super().__init__(config)
        if config.lm2_kind not in ("lm2", "rmt"):
            raise ValueError(f"lm2_kind={config.lm2_kind!r}: must be 'lm2' or 'rmt'")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        L_m = config.memory_layers
        self.layers = nn.ModuleList([Block(config, i < L_m) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.slots = config.memory_slots if (L_m or config.lm2_kind == "rmt") else 0
        if self.slots and config.memory_init == "learned":
            self.memory_init = nn.Parameter(torch.eye(self.slots, config.hidden_size))
        self.post_init()

    def initial_memory(self, batch: int) -> torch.Tensor:
        """M_0 (batch, N, D) float32: eye(N, D), or the learned `memory_init`."""
        D, dev = self.config.hidden_size, self.embed_tokens.weight.device
        m0 = self.memory_init.float() if hasattr(self, "memory_init") else torch.eye(self.slots, D, device=dev)
        return m0[None].expand(batch, self.slots, D)

    def _segment(self, tokens, pos, doc, mem):
        """Final-norm hidden states (B, S, D) of one segment and the memory after it."""
        h = self.embed_tokens(tokens)
        rmt = self.config.lm2_kind == "rmt" and self.slots
        if rmt:  # [m read tokens | segment | m write tokens]
            B, m = tokens.shape[0], self.slots
            off = torch.arange(m, device=pos.device)[None]
            last = torch.where(doc != 0, pos, pos[:, :1]).amax(1, keepdim=True)
            pos = torch.cat([pos[:, :1] - m + off, pos, last + 1 + off], 1)
            doc = torch.cat([torch.full((B, m), READ_DOC, device=doc.device, dtype=doc.dtype), doc,
                             torch.full((B, m), WRITE_DOC, device=doc.device, dtype=doc.dtype)], 1)
            h = torch.cat([mem.to(h.dtype), h, mem.to(h.dtype)], 1)
        valid = doc != 0
        angles = pos.float()[..., None] * rope_inv_freq(self.config).to(pos.device)
        cos, sin = angles.cos(), angles.sin()
        mask = attention_mask(doc, shared=bool(rmt))
        w = mem
        for layer in self.layers:
            h, w = layer(h, w, mem, cos, sin, mask, doc, valid)
        h = self.norm(h)
        if rmt:
            h, w = h[:, m:-m], h[:, -m:].float()
            valid = valid[:, m:-m]
        if self.slots:  # a segment without a single real token leaves the memory as it was
            w = torch.where(valid.any(1)[:, None, None], w, mem)
        return h, w

    def forward(self, input_ids, doc_ids=None, position_offset: int = 0, memory=None):
        """(hidden states (B, T, D), final memory) for right-aligned rows: `doc_ids` 1 at real
        tokens, 0 at padding; positions start at `position_offset`."""
        B, T = input_ids.shape
        S = self.config.segment_len if 0 < self.config.segment_len < T else T
        doc = torch.ones_like(input_ids) if doc_ids is None else doc_ids.to(input_ids.dtype)
        pad = (-T) % S
        tokens, doc = F.pad(input_ids, (0, pad)), F.pad(doc, (0, pad))
        pos = (torch.arange(T + pad, device=input_ids.device) + position_offset)[None].expand(B, -1)
        mem = self.initial_memory(B) if memory is None else memory.float()
        outs = []
        for lo in range(0, T + pad, S):
            h, mem = self._segment(tokens[:, lo:lo + S], pos[:, lo:lo + S], doc[:, lo:lo + S], mem)
            outs.append(h)
        return torch.cat(outs, 1)[:, :T], mem


class LM2ForCausalLM(LM2PreTrainedModel, GenerationMixin):
    def __init__(self, config: LM2Config):
        super().__init__(config)
        self.model = LM2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return getattr(self, "lm_head", None)

    def forward(self, input_ids=None, attention_mask=None, labels=None, memory=None, position_offset: int = 0,
                **kwargs):
        if input_ids is None:
            raise ValueError("LM2ForCausalLM needs input_ids (inputs_embeds are not supported)")
        B, T = input_ids.shape
        if memory is not None and self.config.segment_len and position_offset % self.config.segment_len:
            raise ValueError(f"position_offset={position_offset}: a chunk continuing a memory must start at a "
                             f"segment boundary (a multiple of segment_len={self.config.segment_len})")
        shift = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device).long()
            shift = attention_mask.argmax(1) * attention_mask.any(1)  # leading padding per row
            if bool(shift.any()):  # align each row to its first real token
                idx = (torch.arange(T, device=input_ids.device)[None] + shift[:, None]) % T
                input_ids, attention_mask = input_ids.gather(1, idx), attention_mask.gather(1, idx)
            else:
                shift = None
        h, mem = self.model(input_ids, attention_mask, position_offset, memory)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(h, head.to(h.dtype)).float()
        if shift is not None:  # back to the caller's layout
            idx = (torch.arange(T, device=logits.device)[None] - shift[:, None]) % T
            logits = logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return LM2Output(loss=loss, logits=logits, memory=mem)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No KV cache: every step sees the whole sequence so far (the memory is rebuilt from it).
        return {"input_ids": input_ids, "attention_mask": attention_mask}
