"""ServerConfig: everything the HTTP layer needs, frozen and validated once at start-up."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None             # default: the engine's model name
    model_path: str | None = None                    # shown as the base model's `root`
    api_keys: tuple[tuple[str, str], ...] = ()       # (key, client name); empty: no auth
    lora_root: str | None = None                     # runtime adapter loading only below it
    lora_modules: tuple[tuple[str, str], ...] = ()   # (name, path) loaded at start-up
    max_request_bytes: int = 1 << 20
    shutdown_grace_s: float = 10.0
    warmup: str = "auto"                             # auto | full | off (server/cli.py warmup)

    def __post_init__(self):
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if self.lora_root is not None:
            if not os.path.isdir(self.lora_root):
                raise ValueError(f"--lora-root {self.lora_root!r} is not a directory")
            object.__setattr__(self, "lora_root", os.path.realpath(self.lora_root))
        object.__setattr__(self, "api_keys", tuple((str(k), str(c)) for k, c in self.api_keys))
        object.__setattr__(self, "lora_modules", tuple((str(n), str(p)) for n, p in self.lora_modules))
        names = [n for n, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError("--lora-modules names must be unique")
        for key, _ in self.api_keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("API keys must be non-empty and contain no whitespace")
        if self.warmup not in ("auto", "full", "off"):
            raise ValueError(f"warmup must be auto, full or off, got {self.warmup!r}")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
