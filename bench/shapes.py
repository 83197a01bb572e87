"""Model shapes the benchmarks build with random weights (no download)."""
from graph.config import LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

SHAPES = {
    "1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 32.0},
                      tie_word_embeddings=True, torch_dtype="bfloat16"),
    "8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, rope_scaling={**LLAMA3_ROPE, "factor": 8.0},
                      tie_word_embeddings=False, torch_dtype="bfloat16"),
}
NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3.1-8B"}


def hf_config_dict(config: LlamaConfig) -> dict:
    """The same shape as a Hugging Face config.json dict (for transformers' side of the run)."""
    c = config
    return dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                tie_word_embeddings=c.tie_word_embeddings, torch_dtype="bfloat16")
