"""One instance's execution: config, model families, paged KV cache, attention, sampler."""
