"""Multi-LoRA serving (S-LoRA style): host adapter store, adapters paged in the KV pool, gathered LoRA."""
