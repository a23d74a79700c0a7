"""Building blocks of GPT-2: attention (with its KV cache) and the transformer layer."""
