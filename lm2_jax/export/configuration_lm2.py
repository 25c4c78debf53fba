"""The Hugging Face config of an LM2 (or RMT) export from lm2-jax (https://github.com/lm2-jax).

Shipped inside every export folder beside `modeling_lm2.py`; `config.json`'s `auto_map` points
`AutoConfig` here. Depends only on `transformers`' public `PretrainedConfig`; the Llama keys have
their usual meaning, the others are lm2-jax's `model` config section (docs/design.md §2):

    lm2_kind            "lm2" (memory bank in the first `memory_layers` blocks) or "rmt"
    memory_layers       L_m (0 with "rmt")
    memory_slots        N slots (RMT: memory tokens)
    memory_heads        H_m heads of the memory read (d_h = hidden_size / H_m)
    memory_top_k        0 = softmax over all slots; k > 0 = over the k best
    memory_init         "identity" (M_0 = eye(N, D)) or "learned" (`model.memory_init`)
    memory_write_candidate  "memory" (tanh of the routed read) or "tokens" (tanh(X̄ W_c))
    memory_placement    "parallel" (read/write from the block input) or "after_attention"
    memory_normalize_bank   RMS-normalise the bank before its key/value projections
    memory_routing      "normalized" or "mass" (how a segment is routed to the slots)
    memory_write_rule   "gated" (once per segment, the paper's gates) or "delta" (token by token)
    memory_address      "content" (slot keys projected from the bank) or "slots" (learned `slot_keys`)
    memory_read_scope   "segment" (a segment reads the memory the previous one left) or "token" (each
                        token reads it as the tokens before it left it, its own segment's included)
    segment_len         S; 0 = the whole input is one segment
    conv_width          K > 0: a causal depthwise convolution over K tokens inside each segment
"""

from transformers import PretrainedConfig


class LM2Config(PretrainedConfig):
    model_type = "lm2"

    def __init__(self, vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=None, rms_norm_eps=1e-5,
                 rope_parameters=None, max_position_embeddings=8192, tie_word_embeddings=True,
                 lm2_kind="lm2", memory_layers=0, memory_slots=16, memory_heads=4, memory_top_k=0,
                 memory_init="identity", memory_write_candidate="memory", memory_placement="parallel",
                 memory_normalize_bank=False, memory_routing="normalized", memory_write_rule="gated",
                 memory_address="content", memory_read_scope="segment", segment_len=0, conv_width=0,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.max_position_embeddings = max_position_embeddings
        self.lm2_kind = lm2_kind
        self.memory_layers = memory_layers
        self.memory_slots = memory_slots
        self.memory_heads = memory_heads
        self.memory_top_k = memory_top_k
        self.memory_init = memory_init
        self.memory_write_candidate = memory_write_candidate
        self.memory_placement = memory_placement
        self.memory_normalize_bank = memory_normalize_bank
        self.memory_routing = memory_routing
        self.memory_write_rule = memory_write_rule
        self.memory_address = memory_address
        self.memory_read_scope = memory_read_scope
        self.segment_len = segment_len
        self.conv_width = conv_width
        # Generation re-runs the whole input each step (modeling_lm2.py), so there is no KV cache.
        kwargs.setdefault("use_cache", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
