"""jaxserve HTTP server: OpenAI-compatible and S-LoRA-native endpoints over aiohttp."""
