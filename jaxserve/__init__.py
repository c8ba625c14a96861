"""jaxserve: a JAX LLM serving engine (paged KV cache, continuous batching, multi-LoRA, VTC)."""
__version__ = "0.1.0"
