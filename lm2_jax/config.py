"""The configuration schema of lm2-jax and its validation.

Configs are code (`configs/*.py` return an `ml_collections.ConfigDict`); this module holds the
defaults each section starts from and `validate`, which turns every impossible value into one
`ConfigError` naming the field (`model.n_heads`) and the value, before anything is compiled.
"""

from __future__ import annotations

import os

import ml_collections

from lm2_jax.errors import ConfigError

ROPE_SCALINGS = ("none", "llama3")
MEMORY_INITS = ("identity", "learned")
WRITE_CANDIDATES = ("memory", "tokens")
CARRY_MODES = ("sequence", "stream")
MEMORY_PLACEMENTS = ("parallel", "after_attention")
MEMORY_ROUTINGS = ("normalized", "mass")
WRITE_RULES = ("gated", "delta")
MEMORY_ADDRESSES = ("content", "slots")
READ_SCOPES = ("segment", "token")
MODEL_KINDS = ("lm2", "rmt")


def model_defaults() -> ml_collections.ConfigDict:
    """The `model` section. Shapes follow Llama-3; `memory` is LM2's memory bank (docs/design.md §2)."""
    memory = ml_collections.ConfigDict(
        dict(
            layers=0,  # L_m: memory in the first L_m blocks; 0 = vanilla Llama.
            slots=16,  # N
            heads=4,  # H_m; d_h = d_model / heads
            top_k=0,  # 0 = full softmax over slots; k > 0 keeps the k best slots per token.
            init="identity",  # M_0 = eye(N, D) or a learned N x D parameter.
            write_candidate="memory",  # tanh(E_mem routed) (the paper) or tanh(X routed W_c).
            segment_len=0,  # S; 0 = the whole sequence is one segment.
            carry="sequence",  # reset memory per row, or stream it across train steps.
            bptt_segments=0,  # truncate the gradient through memory every k segments; 0 = full.
            forget_bias_init=1.0,  # b_f starts at +1 so memory is kept early in training.
            remat_segments=True,  # jax.checkpoint each segment of the recurrence.
            # Without remat_segments, a sequence of at most this many segments runs them unrolled in
            # the program instead of by lax.scan; 0 = always a scan (docs/design.md §2 table).
            unroll_segments=0,
            # parallel: read/write from the block input beside self-attention (the paper);
            # after_attention: from the residual after self-attention (its own RMSNorm).
            placement="parallel",
            normalize_bank=False,  # RMS-normalise the memory before its key/value projections.
            # normalized: P = Āᵀ / column sums (each slot an average of the segment);
            # mass: P = Āᵀ / valid tokens (a slot receives in proportion to its attention).
            routing="normalized",
            # gated: W = g_in * candidate + g_f * W_prev, once per segment (docs/design.md §2);
            # delta: token by token, M += beta a (v - a M) at each token's read address.
            write_rule="gated",
            # content: the read's slot keys are projections of the memory (the paper);
            # slots: each slot has a learned key of its own, so a slot is found by who it is for,
            # not by what it holds (the values still come from the memory).
            address="content",
            # segment: a segment reads the memory as the previous segment left it (docs/design.md §2);
            # token: each token reads it as the tokens before it left it, its own segment's included
            # (needs write_rule="delta" and address="slots").
            read_scope="segment",
        )
    )
    rope_scaling = ml_collections.ConfigDict(
        dict(
            type="none",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_len=8192,
        )
    )
    return ml_collections.ConfigDict(
        dict(
            # lm2: LM2's memory bank in the first memory.layers blocks (0 = vanilla Llama);
            # rmt: the Recurrent Memory Transformer (Bulatov et al. 2022) on the same backbone,
            # memory.slots memory tokens read before each segment and written after it
            # (memory.layers must be 0; docs/design.md §3).
            kind="lm2",
            vocab_size=8192,
            d_model=128,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_ff=384,
            # > 0: a causal depthwise convolution over this many tokens (of the same document, inside
            # the segment) on every block's normed input; 0 = plain Llama (docs/design.md §2).
            conv_width=0,
            norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling=rope_scaling,
            tie_embeddings=True,
            init_std=0.02,
            dtype="float32",  # compute dtype of activations and matmuls
            param_dtype="float32",
            remat="none",  # per-layer rematerialisation policy inside the layer scan
            # auto: splash on TPU, cuDNN on GPU where they apply, else blocked (lm2_jax/model/kernels.py);
            # "einsum" builds the full S x S scores (the simple reference)
            attention="auto",
            memory=memory,
        )
    )


def train_defaults() -> ml_collections.ConfigDict:
    """The `train` section: optimizer, schedule, logging, evaluation and checkpointing."""
    return ml_collections.ConfigDict(
        dict(
            steps=600,
            lr=3e-3,  # peak of the warmup + cosine schedule
            warmup_steps=50,
            end_lr_frac=0.1,  # the cosine decays to lr * end_lr_frac at `steps`
            memory_lr_mult=1.0,  # the LM2 memory blocks' parameters train at lr * memory_lr_mult
            weight_decay=0.1,  # AdamW; never applied to norms, biases or the memory init
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,  # global-norm gradient clipping
            grad_accum=1,  # micro-batches per optimizer step
            loss_positions=0,  # k > 0: vocabulary logits only at each row's first k loss targets (QA)
            seed=0,
            log_every=10,
            eval_every=0,  # 0 = evaluate only at the end
            eval_task="qa1",  # real bAbI test file evaluated (exact match) during and after training; '' = none
            eval_samples=1000,  # 0 = the whole file (QA); rows of data.eval_paths evaluated (0: 1000)
            eval_batch_size=100,
            checkpoint_every=100,
            keep_checkpoints=3,
            async_checkpoint=True,
            stop_at_step=0,  # end this run (with a checkpoint) at this step; the schedule still spans `steps`
            # "length:seq_len:steps,..." (lm2_jax/train/curriculum.py): stages of longer babilong
            # samples; '' = none. A stage ends early once its held-out exact match reaches
            # curriculum_threshold (0 = never), checked every eval_every steps.
            curriculum="",
            curriculum_threshold=0.0,
            # a workdir (e.g. `python -m lm2_jax.export --from_hf` output) whose newest checkpoint's
            # params start this run when it has no checkpoint of its own; '' = fresh initialisation
            init_from="",
        )
    )


def _require(cond: bool, field: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(field, value, why)


def _positive_int(section, prefix: str, name: str, allow_zero: bool = False) -> None:
    value = section[name]
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    why = "must be a non-negative integer" if allow_zero else "must be a positive integer"
    _require(ok, f"{prefix}.{name}", value, why)


def _choice(section, prefix: str, name: str, choices) -> None:
    value = section[name]
    _require(value in choices, f"{prefix}.{name}", value, f"must be one of {', '.join(map(repr, choices))}")


def validate_model(model: ml_collections.ConfigDict, prefix: str = "model") -> None:
    """Raise `ConfigError` for the first impossible value in the model section."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        _positive_int(model, prefix, name)
    _require(model.d_model % model.n_heads == 0, f"{prefix}.n_heads", model.n_heads,
             f"must divide {prefix}.d_model={model.d_model}")
    head_dim = model.d_model // model.n_heads
    _require(head_dim % 2 == 0, f"{prefix}.n_heads", model.n_heads,
             f"gives an odd head dim {head_dim}; RoPE needs an even one")
    _require(model.n_heads % model.n_kv_heads == 0, f"{prefix}.n_kv_heads", model.n_kv_heads,
             f"must divide {prefix}.n_heads={model.n_heads} (grouped-query attention)")
    _positive_int(model, prefix, "conv_width", allow_zero=True)
    _require(model.norm_eps > 0, f"{prefix}.norm_eps", model.norm_eps, "must be > 0")
    _require(model.rope_theta > 0, f"{prefix}.rope_theta", model.rope_theta, "must be > 0")
    _require(model.init_std > 0, f"{prefix}.init_std", model.init_std, "must be > 0")
    _require(isinstance(model.tie_embeddings, bool), f"{prefix}.tie_embeddings", model.tie_embeddings, "must be a bool")
    from lm2_jax.model import decoder, layers  # the model's registries hold the choices

    _choice(model, prefix, "dtype", tuple(layers.DTYPES))
    _choice(model, prefix, "param_dtype", tuple(layers.DTYPES))
    _choice(model, prefix, "remat", tuple(decoder.REMAT_POLICIES))
    _choice(model, prefix, "attention", ("auto", *layers.ATTENTION_FNS))
    if model.attention == "splash":
        from lm2_jax.model import kernels

        seg = model.memory.segment_len
        why = kernels.supports("splash", platform="tpu", kind=model.kind, seg_len=seg or kernels.SPLASH_MULTIPLE,
                               head_dim=head_dim, dtype=model.dtype)
        _require(not why, f"{prefix}.attention", model.attention, why)

    rs, rp = model.rope_scaling, f"{prefix}.rope_scaling"
    _choice(rs, rp, "type", ROPE_SCALINGS)
    if rs.type == "llama3":
        _require(rs.factor >= 1, f"{rp}.factor", rs.factor, "must be >= 1")
        _require(rs.low_freq_factor > 0, f"{rp}.low_freq_factor", rs.low_freq_factor, "must be > 0")
        _require(rs.high_freq_factor > rs.low_freq_factor, f"{rp}.high_freq_factor", rs.high_freq_factor,
                 f"must be > {rp}.low_freq_factor={rs.low_freq_factor}")
        _positive_int(rs, rp, "original_max_len")

    mem, mp = model.memory, f"{prefix}.memory"
    _choice(model, prefix, "kind", MODEL_KINDS)
    rmt = model.kind == "rmt"
    _positive_int(mem, mp, "layers", allow_zero=True)
    _require(mem.layers <= model.n_layers, f"{mp}.layers", mem.layers,
             f"L_m cannot exceed {prefix}.n_layers={model.n_layers}")
    _require(not (rmt and mem.layers), f"{mp}.layers", mem.layers,
             f"{prefix}.kind='rmt' has no LM2 memory blocks; set it to 0 (memory.slots is RMT's memory tokens)")
    _positive_int(mem, mp, "slots", allow_zero=rmt)
    _positive_int(mem, mp, "heads")
    _require(model.d_model % mem.heads == 0, f"{mp}.heads", mem.heads, f"must divide {prefix}.d_model={model.d_model}")
    _positive_int(mem, mp, "top_k", allow_zero=True)
    _require(mem.top_k <= mem.slots, f"{mp}.top_k", mem.top_k, f"cannot exceed {mp}.slots={mem.slots}")
    _choice(mem, mp, "init", MEMORY_INITS)
    _choice(mem, mp, "write_candidate", WRITE_CANDIDATES)
    _positive_int(mem, mp, "segment_len", allow_zero=True)
    _choice(mem, mp, "carry", CARRY_MODES)
    _choice(mem, mp, "placement", MEMORY_PLACEMENTS)
    _choice(mem, mp, "routing", MEMORY_ROUTINGS)
    _choice(mem, mp, "write_rule", WRITE_RULES)
    _choice(mem, mp, "address", MEMORY_ADDRESSES)
    _choice(mem, mp, "read_scope", READ_SCOPES)
    _require(mem.read_scope == "segment" or (mem.write_rule == "delta" and mem.address == "slots"), f"{mp}.read_scope",
             mem.read_scope, "'token' needs write_rule='delta' and address='slots' (token-by-token writes at addresses"
             " that do not depend on the memory)")
    _require(mem.read_scope == "segment" or mem.layers <= 1, f"{mp}.layers", mem.layers,
             "read_scope='token' supports one memory block: a second block's write chain would start from the"
             " first block's writes of the whole segment, later tokens included")
    _require(mem.write_rule != "delta" or mem.write_candidate == "tokens", f"{mp}.write_candidate",
             mem.write_candidate, "must be 'tokens' with write_rule='delta' (it writes each token's own candidate)")
    _require(isinstance(mem.normalize_bank, bool), f"{mp}.normalize_bank", mem.normalize_bank, "must be a bool")
    _positive_int(mem, mp, "bptt_segments", allow_zero=True)
    _require(isinstance(mem.remat_segments, bool), f"{mp}.remat_segments", mem.remat_segments, "must be a bool")
    _positive_int(mem, mp, "unroll_segments", allow_zero=True)


def validate_train(train: ml_collections.ConfigDict, prefix: str = "train") -> None:
    for name in ("steps", "grad_accum", "log_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints"):
        _positive_int(train, prefix, name)
    for name in ("warmup_steps", "eval_every", "eval_samples", "seed", "stop_at_step", "loss_positions"):
        _positive_int(train, prefix, name, allow_zero=True)
    _require(train.lr > 0, f"{prefix}.lr", train.lr, "must be > 0")
    _require(0 <= train.end_lr_frac <= 1, f"{prefix}.end_lr_frac", train.end_lr_frac, "must be in [0, 1]")
    _require(train.weight_decay >= 0, f"{prefix}.weight_decay", train.weight_decay, "must be >= 0")
    for name in ("b1", "b2"):
        _require(0 <= train[name] < 1, f"{prefix}.{name}", train[name], "must be in [0, 1)")
    _require(train.eps > 0, f"{prefix}.eps", train.eps, "must be > 0")
    _require(train.clip_norm > 0, f"{prefix}.clip_norm", train.clip_norm, "must be > 0")
    _require(train.memory_lr_mult > 0, f"{prefix}.memory_lr_mult", train.memory_lr_mult, "must be > 0")
    _require(isinstance(train.curriculum, str), f"{prefix}.curriculum", train.curriculum,
             "must be a string of length:seq_len:steps stages ('' = none)")
    _require(0 <= train.curriculum_threshold <= 1, f"{prefix}.curriculum_threshold", train.curriculum_threshold,
             "must be in [0, 1] (0 = stages end only by their step budgets)")
    _require(isinstance(train.init_from, str), f"{prefix}.init_from", train.init_from,
             "must be a workdir path ('' = none)")
    _require(isinstance(train.async_checkpoint, bool), f"{prefix}.async_checkpoint", train.async_checkpoint,
             "must be a bool")
    from lm2_jax.data import babi
    from lm2_jax.errors import DataError

    try:
        if train.eval_task:  # '' = no QA evaluation (a pretraining run: data.eval_paths)
            babi.canonical_task(train.eval_task)
    except DataError as err:
        raise ConfigError(f"{prefix}.eval_task", train.eval_task, f"not a bAbI task ({', '.join(babi.TASKS)})") from err


def validate_mesh(mesh: ml_collections.ConfigDict) -> None:
    from lm2_jax import parallel

    shape = tuple(mesh.shape)
    _require(len(shape) == 3 and all(isinstance(s, int) and (s > 0 or s == -1) for s in shape)
             and shape.count(-1) <= 1, "mesh.shape", shape,
             f"must be 3 sizes for {parallel.AXES}, each > 0 or a single -1")
    for entry in mesh.rules:
        ok = len(entry) == 2 and isinstance(entry[0], str)
        axes = entry[1] if ok else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        _require(ok and all(a in parallel.AXES for a in axes), "mesh.rules", tuple(entry),
                 f"each rule is (logical name, mesh axis or tuple of axes from {parallel.AXES} or None)")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validate every section present in a full config; returns it for chaining."""
    _require("model" in config, "model", None, "a config needs a model section")
    validate_model(config.model)
    if "train" in config:
        validate_train(config.train)
    if "mesh" in config:
        validate_mesh(config.mesh)
    if "data" in config:
        from lm2_jax.data import options

        options.validate(config.data)
        if "train" in config:
            from lm2_jax.train import curriculum

            curriculum.validate(config)
            _require(config.data.batch_size % config.train.grad_accum == 0, "train.grad_accum",
                     config.train.grad_accum, f"must divide data.batch_size={config.data.batch_size}")
    return config


def describe_model(model: ml_collections.ConfigDict) -> str:
    """One line naming what was trained, e.g. `LM2, memory in 1 of 2 blocks, 16 slots, segments of 16`."""
    mem = model.memory
    S = f"segments of {mem.segment_len}" if mem.segment_len else "one segment (full attention)"
    if model.conv_width:
        S += f", {model.conv_width}-token convolution"
    if model.kind == "rmt":
        return f"RMT, {mem.slots} memory tokens, {model.n_layers} blocks, {S}"
    if not mem.layers:
        return f"vanilla Llama (no memory), {model.n_layers} blocks, {S}"
    notes = [note for on, note in ((mem.write_rule == "delta", "delta-rule write"),
                                   (mem.address == "slots", "learned slot keys"),
                                   (mem.read_scope == "token", "read token by token")) if on]
    write = f" ({', '.join(notes)})" if notes else ""
    return f"LM2, memory in {mem.layers} of {model.n_layers} blocks, {mem.slots} slots{write}, {S}"


def checkout_config(name: str) -> str:
    """Path of `configs/<name>` in the checkout this package runs from (`pip install -e .`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)


def head_dim(model: ml_collections.ConfigDict) -> int:
    return model.d_model // model.n_heads


def defaults() -> ml_collections.ConfigDict:
    """A full config with every section at its default; `configs/*.py` start from this."""
    from lm2_jax import parallel
    from lm2_jax.data import options

    return ml_collections.ConfigDict(dict(model=model_defaults(), train=train_defaults(), data=options.defaults(),
                                          mesh=parallel.mesh_defaults()))


def llama32_1b_backbone(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Set a model section to Llama-3.2-1B's published shapes (16 blocks, D=2048, GQA 32/8, tied
    embeddings, RoPE θ=500000 with Llama-3 scaling), in bfloat16 compute with per-layer remat."""
    m.vocab_size = 128256
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 2048, 16, 32, 8, 8192
    m.norm_eps = 1e-5
    m.rope_theta = 500000.0
    m.rope_scaling.update(dict(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_len=8192))
    m.tie_embeddings = True
    m.dtype = "bfloat16"
    m.remat = "dots_no_batch"
    return m
