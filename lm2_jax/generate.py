"""Generation with test-time memory: prefill segment by segment, then one token at a time.

    python -m lm2_jax.generate --workdir=runs/tiny --prompt="Mary went to the kitchen. Where is Mary?"

The memory is carried exactly as in training (docs/design.md §2, "Generation"): a row is cut into
segments of `model.memory.segment_len` tokens from its first token; every token of segment s reads
the snapshot M_s; when segment s is complete its write runs and M_{s+1} is what segment s+1 reads.
So generated logits equal `decoder.forward`'s teacher-forced logits at every position
(`tests/test_generate.py`).

What is kept between tokens (`DecodeState`, an explicit value) is the N x D memory and the current
segment: its keys and values per layer, its tokens, and the bank's keys and values per memory
block (the memory only changes at segment boundaries, so they are computed once per segment).
The cost of a token does not grow with the context already consumed. The write of a completed
segment re-runs that segment's forward pass (its tokens are all known by then): one segment's
forward per S generated tokens, and the memory written is, by construction, the one training
computes.

With `segment_len=0` (one segment: plain full attention) the segment, and so the cache, spans the
whole prompt plus the generated tokens.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm2_jax.errors import UsageError
from lm2_jax.model import decoder, memory as memlib
from lm2_jax.model.layers import dtype_of

Array = jax.Array


class DecodeState(NamedTuple):
    """Everything generation carries from one token to the next (B rows, C = segment length)."""

    mem_BND: Array  # M_s: the memory the current segment reads
    # {"mem_blocks"/"blocks": (k, v)}, each (layers, B, C, K, Dh): the current segment's cache (with
    # `conv_width`, then the convolution's inputs, (layers, B, C, D)); for
    # "mem_blocks" followed by the bank's keys and values, each (layers, B, H, N, Dh)
    kv: dict
    seg_tokens_BC: Array  # the current segment's tokens (for its write once complete)
    seg_doc_BC: Array  # 1 where the current segment has a token, 0 where it is still empty
    fill_B: Array  # tokens in the current segment
    pos_B: Array  # absolute position of the next token


def max_context(config: ml_collections.ConfigDict) -> int:
    """The most tokens a trained model can consume: unbounded (0) when the memory carries the
    context segment by segment; with one segment (plain attention over the whole row) the longest
    row it was trained on, `data.seq_len`, beyond which its positions were never seen."""
    return 0 if config.model.memory.segment_len else int(config.data.seq_len)


def segment_length(cfg: ml_collections.ConfigDict, max_total_len: int) -> int:
    """Tokens per segment in generation: `memory.segment_len`, or the whole row when it is 0."""
    return cfg.memory.segment_len or max_total_len


def _reruns_segment(cfg) -> bool:
    """No KV cache: each new token re-runs its segment so far (`_segment_hidden`). RMT's write tokens
    follow the segment; with `memory.read_scope="token"` each token reads the memory as the tokens
    before it in the segment wrote it, which only the segment's forward pass computes."""
    return cfg.kind == "rmt" or (cfg.memory.layers > 0 and cfg.memory.read_scope == "token")


def _empty_kv(cfg, batch: int, C: int) -> dict:
    K, dh, dtype = cfg.n_kv_heads, cfg.d_model // cfg.n_heads, dtype_of(cfg.dtype)
    kv = {}
    if _reruns_segment(cfg):
        return kv
    for name, n in (("mem_blocks", cfg.memory.layers), ("blocks", cfg.n_layers - cfg.memory.layers)):
        if n:
            kv[name] = (jnp.zeros((n, batch, C, K, dh), dtype),) * 2
            if cfg.conv_width:  # the convolution's input of every token of the segment so far
                kv[name] += (jnp.zeros((n, batch, C, cfg.d_model), dtype),)
    return kv


def _with_bank(cfg, params, kv: dict, mem_BND: Array) -> dict:
    """`kv` with the bank keys and values of every memory block recomputed from `mem_BND`."""
    if not cfg.memory.layers or _reruns_segment(cfg):
        return kv
    bank = jax.vmap(lambda p: memlib.block_bank_kv(cfg, p, mem_BND))(params["mem_blocks"]["memory"])
    return dict(kv, mem_blocks=(*kv["mem_blocks"][:decoder.cache_entries(cfg)], *bank))


def initial_state(cfg, params, mem_BND: Array, C: int, pos_B: Array) -> DecodeState:
    """The state at a segment boundary: memory `mem_BND`, an empty segment of C tokens, the next
    token at position `pos_B` (e.g. after a context consumed by `decoder.forward`)."""
    B = mem_BND.shape[0]
    zeros_BC = jnp.zeros((B, C), jnp.int32)
    kv = _with_bank(cfg, params, _empty_kv(cfg, B, C), mem_BND)
    return DecodeState(mem_BND, kv, zeros_BC, zeros_BC, jnp.zeros((B,), jnp.int32), jnp.asarray(pos_B, jnp.int32))


def _segment_positions(start_B: Array, C: int) -> Array:
    return start_B[:, None] + jnp.arange(C, dtype=jnp.int32)[None, :]


def _write(cfg, params, mem_BND, tokens_BC, start_B):
    """M_{s+1} from a completed segment: the training forward pass over its C tokens."""
    C = tokens_BC.shape[1]
    _, new_mem = decoder.LM2(cfg, hidden=True).apply(
        {"params": params}, tokens_BC, _segment_positions(start_B, C), jnp.ones_like(tokens_BC), mem_BND)
    return new_mem


def _segment_hidden(cfg, params, tokens_BS, positions_BS, doc_BS, mem_BND, cache):
    """Final-norm hidden states of the new tokens and the updated cache. Without a KV cache
    (`_reruns_segment`) the call re-runs the segment so far (C tokens, those not yet generated as
    padding) and returns the states at the new tokens' places `cache["index"]` + [0, S)."""
    model = decoder.LM2(cfg, hidden=True)
    if not _reruns_segment(cfg):
        h, _, kv = model.apply({"params": params}, tokens_BS, positions_BS, doc_BS, mem_BND, cache=cache)
        return h, kv
    seg_tokens_BC, seg_doc_BC, index_B = cache["tokens"], cache["doc"], cache["index"]
    C, S = seg_tokens_BC.shape[1], tokens_BS.shape[1]
    start_B = positions_BS[:, 0] - index_B
    h_BCD, _ = model.apply({"params": params}, seg_tokens_BC, _segment_positions(start_B, C), seg_doc_BC, mem_BND)
    at_BS = index_B[:, None] + jnp.arange(S)[None, :]
    return jnp.take_along_axis(h_BCD, jnp.minimum(at_BS, C - 1)[..., None], axis=1), {}


def prefill(cfg, params, prompts_BL: Array, lengths_B: Array, C: int) -> tuple[Array, DecodeState]:
    """Consume right-padded prompts (row b: its first `lengths_B[b]` tokens, ≥ 1); returns the
    logits (B, V) of each row's next token and the state after the prompt.

    The prompt's complete segments run through `decoder.forward` with every later token marked as
    padding (a segment without valid tokens leaves the memory as it is), so each row's memory has
    seen exactly its complete segments. Its partial last segment (0..C-1 tokens) then fills the
    cache.
    """
    B, L = prompts_BL.shape
    n_full_B = lengths_B // C
    start_B = n_full_B * C
    rest_B = lengths_B - start_B
    mem_BND = decoder.initial_memory(cfg, params, B)
    last_h_BD = jnp.zeros((B, cfg.d_model), jnp.float32)
    if L >= C:  # some row may have a complete segment
        in_full_BL = (jnp.arange(L)[None, :] < start_B[:, None]).astype(jnp.int32)
        h_BLD, mem_BND = decoder.forward(cfg, params, prompts_BL, doc_ids_BT=in_full_BL, mem_BND=mem_BND,
                                         hidden=True)
        last_h_BD = jnp.take_along_axis(h_BLD, jnp.maximum(lengths_B - 1, 0)[:, None, None], axis=1)[:, 0]
    padded_BL = jnp.pad(prompts_BL, ((0, 0), (0, C)))
    seg_tokens_BC = jnp.take_along_axis(padded_BL, _segment_positions(start_B, C), axis=1)
    seg_doc_BC = (jnp.arange(C)[None, :] < rest_B[:, None]).astype(jnp.int32)
    cache = {"doc": seg_doc_BC, "index": jnp.zeros((B,), jnp.int32), "tokens": seg_tokens_BC}
    cache.update(_with_bank(cfg, params, _empty_kv(cfg, B, C), mem_BND))
    h_BCD, kv = _segment_hidden(cfg, params, seg_tokens_BC, _segment_positions(start_B, C), seg_doc_BC, mem_BND,
                                cache)
    seg_h_BD = jnp.take_along_axis(h_BCD, jnp.maximum(rest_B - 1, 0)[:, None, None], axis=1)[:, 0]
    h_BD = jnp.where((rest_B > 0)[:, None], seg_h_BD, last_h_BD.astype(seg_h_BD.dtype))
    logits_BV = decoder.project(cfg, params, h_BD[:, None])[:, 0]
    state = DecodeState(mem_BND, kv, seg_tokens_BC, seg_doc_BC, rest_B, lengths_B.astype(jnp.int32))
    return logits_BV, state


def decode_step(cfg, params, state: DecodeState, token_B: Array) -> tuple[Array, DecodeState]:
    """Feed one token per row; returns the next token's logits (B, V) and the new state. A row whose
    segment this token completes runs the segment's write and starts an empty segment."""
    C = state.seg_doc_BC.shape[1]
    here_BC = jnp.arange(C)[None, :] == state.fill_B[:, None]
    seg_tokens_BC = jnp.where(here_BC, token_B[:, None], state.seg_tokens_BC)
    seg_doc_BC = jnp.where(here_BC, 1, state.seg_doc_BC)
    cache = dict(state.kv, doc=seg_doc_BC, index=state.fill_B, tokens=seg_tokens_BC)
    h_B1D, kv = _segment_hidden(cfg, params, token_B[:, None], state.pos_B[:, None], jnp.ones_like(token_B[:, None]),
                                state.mem_BND, cache)
    logits_BV = decoder.project(cfg, params, h_B1D)[:, 0]
    fill_B, pos_B = state.fill_B + 1, state.pos_B + 1
    full_B = fill_B == C
    start_B = pos_B - C

    def next_segment():
        mem_BND = jnp.where(full_B[:, None, None], _write(cfg, params, state.mem_BND, seg_tokens_BC, start_B),
                            state.mem_BND)
        return mem_BND, _with_bank(cfg, params, kv, mem_BND)

    mem_BND, kv = jax.lax.cond(jnp.any(full_B), next_segment, lambda: (state.mem_BND, kv))
    seg_doc_BC = jnp.where(full_B[:, None], 0, seg_doc_BC)
    fill_B = jnp.where(full_B, 0, fill_B)
    return logits_BV, DecodeState(mem_BND, kv, seg_tokens_BC, seg_doc_BC, fill_B, pos_B)


def sample(logits_BV: Array, key: Array, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Next tokens (B,): greedy at temperature 0, else a draw from softmax(logits / temperature)
    restricted to the `top_k` best tokens and to the smallest set whose probability reaches `top_p`."""
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the better tokens
        keep_BV = before_BV < top_p  # the best token is always kept
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(cfg_json: str, C: int, temperature: float, top_k: int, top_p: float):
    """jit-compiled prefill and step for one model config and sampling setting (once per shape)."""
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def first(params, prompts_BL, lengths_B, key):
        logits_BV, state = prefill(cfg, params, prompts_BL, lengths_B, C)
        return logits_BV, pick(logits_BV, key), state

    def step(params, state, token_B, key):
        logits_BV, state = decode_step(cfg, params, state, token_B)
        return logits_BV, pick(logits_BV, key), state

    return jax.jit(first), jax.jit(step)


class Generation(NamedTuple):
    tokens: list[np.ndarray]  # per row: the generated tokens, up to and including <eos>
    logits: np.ndarray | None  # (B, max_new_tokens, V) when asked for: the logits each token was drawn from


def generate(cfg: ml_collections.ConfigDict, params, prompts, max_new_tokens: int, *, eos_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, key: Array | None = None,
             return_logits: bool = False, pad_to: int = 0, max_len: int = 0, truncate: str = "error") -> Generation:
    """Generate up to `max_new_tokens` after each prompt (a list of 1-D int arrays of any lengths).

    A row stops at `eos_id`; all stop when every row has. `key` is required when sampling
    (temperature > 0). Prompts are right-padded to `pad_to` (or their longest, rounded up to 64,
    so batches of similar lengths share one compiled prefill).

    `max_len` > 0 bounds prompt + generated tokens (`max_context`): a longer prompt is an error
    (`truncate="error"`) or loses its oldest tokens after the first (`"left"`).
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature > 0 and key is None:
        raise UsageError("sampling (temperature > 0) needs an explicit PRNG key")
    if not 0.0 < top_p <= 1.0:
        raise UsageError(f"top_p={top_p} must be in (0, 1]")
    if top_k < 0 or top_k > cfg.vocab_size:
        raise UsageError(f"top_k={top_k} must be in [0, vocab size {cfg.vocab_size}]")
    if truncate not in ("error", "left"):
        raise UsageError(f"truncate={truncate!r}: must be 'error' or 'left'")
    if max_len:
        room = max_len - max_new_tokens
        if room < 1:
            raise UsageError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_len={max_len}")
        for i, p in enumerate(prompts):
            if len(p) > room and truncate == "error":
                raise UsageError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} the model "
                                 f"can consume at most {room} (max_len={max_len}; truncate='left' drops the oldest)")
        prompts = [p if len(p) <= room else np.concatenate([p[:1], p[len(p) - room + 1:]]) for p in prompts]
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise UsageError("every prompt needs at least one token")
    L = max(pad_to, -(-int(lengths.max()) // 64) * 64)
    prompts_BL = np.zeros((len(prompts), L), np.int32)
    for b, p in enumerate(prompts):
        prompts_BL[b, :len(p)] = p
    C = segment_length(cfg, L + max_new_tokens)
    first, step = _compiled(cfg.to_json(), C, float(temperature), int(top_k), float(top_p))
    params = nn.meta.unbox(params)
    keys = jax.random.split(key if key is not None else jax.random.key(0), max_new_tokens)
    logits_BV, token_B, state = first(params, jnp.asarray(prompts_BL), jnp.asarray(lengths), keys[0])
    out, all_logits = [np.asarray(token_B)], [np.asarray(logits_BV)] if return_logits else None
    done = out[0] == eos_id if eos_id is not None else np.zeros(len(prompts), bool)
    for i in range(1, max_new_tokens):
        if done.all():
            break
        logits_BV, token_B, state = step(params, state, token_B, keys[i])
        out.append(np.asarray(token_B))
        if return_logits:
            all_logits.append(np.asarray(logits_BV))
        if eos_id is not None:
            done |= out[-1] == eos_id
    steps_BN = np.stack(out, axis=1)
    rows = []
    for row in steps_BN:
        stop = np.flatnonzero(row == eos_id) if eos_id is not None else []
        rows.append(row[:stop[0] + 1] if len(stop) else row)
    return Generation(rows, np.stack(all_logits, axis=1) if return_logits else None)


def _main(argv) -> int:
    from absl import flags, logging as absl_logging

    from lm2_jax import cli
    from lm2_jax.data import qa, tokenizer as toklib
    from lm2_jax.train import checkpoint

    cli.no_extra_args(argv)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore at INFO
    F = flags.FLAGS
    config, params, step = checkpoint.load_params(F.workdir, F.step)
    if (F.prompt is None) == (F.prompt_file is None):
        raise UsageError("give exactly one of --prompt and --prompt_file")
    if F.prompt_file is not None:
        try:
            with open(F.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as err:
            raise UsageError(f"--prompt_file={F.prompt_file}: {err.strerror}") from None
    else:
        text = F.prompt
    tok = toklib.load_tokenizer(config.data.tokenizer or None)
    ids = qa.prompt_from_text(text, tok)
    result = generate(config.model, params, [ids], F.max_new_tokens, eos_id=tok.eos_id,
                      temperature=F.temperature, top_k=F.top_k, top_p=F.top_p, key=jax.random.key(F.seed),
                      max_len=max_context(config), truncate=F.truncate)
    out = result.tokens[0].tolist()
    ended = "ended at <eos>" if out and out[-1] == tok.eos_id else "stopped at --max_new_tokens"
    print(f"[{F.workdir} step {step}: {len(ids)} prompt tokens, {len(out)} generated, {ended}]", file=sys.stderr)
    print(tok.decode(out).strip())
    return 0


if __name__ == "__main__":
    from absl import flags

    from lm2_jax import cli, runtime

    runtime.reexec_with_hugepage_malloc("lm2_jax.generate")
    flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
    flags.DEFINE_string("prompt", None, "Prompt text: a story and a question, e.g. 'Mary went to the kitchen. "
                        "Where is Mary?'. The question-answer format of training is applied.")
    flags.DEFINE_string("prompt_file", None, "Read the prompt from this file instead.")
    flags.DEFINE_integer("max_new_tokens", 16, "Stop after this many tokens (or at <eos>).")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens with this much probability.")
    flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
    flags.DEFINE_enum("truncate", "error", ["error", "left"], "A prompt longer than the model can consume "
                      "(models with one segment: data.seq_len): stop with an error, or drop its oldest tokens.")
    cli.run(_main)
