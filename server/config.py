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
    key_roles: tuple[tuple[str, str], ...] = ()      # (key, "admin" | "metrics"); others: tenant
    lora_root: str | None = None                     # runtime adapter loading only below it
    lora_modules: tuple[tuple[str, str], ...] = ()   # (name, path) loaded at start-up
    max_request_bytes: int = 1 << 20
    shutdown_grace_s: float = 10.0                   # SIGTERM: in-flight requests may finish this long
    header_read_timeout_s: float = 30.0              # a new connection's first request headers
    body_read_timeout_s: float = 60.0                # a request's whole body, once its headers are in
    keep_alive_timeout_s: float = 75.0               # an idle kept-alive connection is closed
    max_connections: int = 1024                      # open connections; beyond: 503 and close
    stream_stall_timeout_s: float = 30.0             # a stream write blocked this long: abort it
    warmup: str = "auto"                             # auto | full | off (server/cli.py warmup)
    # multi-tenancy (docs/server.md, "Security and multi-tenancy")
    allow_tenant_adapters: bool = False              # tenants may load adapters of their own
    max_adapters_per_tenant: int = 4                 # with allow_tenant_adapters
    max_loaded_adapters: int | None = None           # all adapters, start-up modules included
    max_adapter_host_bytes: int | None = None        # host memory of all loaded adapters
    metrics_max_clients: int = 20                    # per-client series in /metrics (+ "other")
    # chat (server/chat.py, server/tools.py)
    chat_template: str | None = None                 # the template's text; None: the model's
    trust_request_chat_template: bool = False        # requests may send their own template
    tool_call_parser: str | None = None              # hermes | llama3_json | mistral
    enable_auto_tool_choice: bool = False            # tool_choice "auto" (needs the parser)

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
        object.__setattr__(self, "key_roles", tuple((str(k), str(r)) for k, r in self.key_roles))
        keys = {k for k, _ in self.api_keys}
        for key, role in self.key_roles:
            if key not in keys or role not in ("admin", "metrics", "tenant"):
                raise ValueError("key_roles must give configured keys the role admin, metrics "
                                 "or tenant")
        if any("~" in n for n in names):   # '~' marks tenants' own adapters (server/lora.py)
            raise ValueError("--lora-modules names may not contain '~'")
        for field in ("max_adapters_per_tenant", "max_loaded_adapters", "max_adapter_host_bytes",
                      "metrics_max_clients"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{field} must be a non-negative integer, got {value!r}")
        if self.warmup not in ("auto", "full", "off"):
            raise ValueError(f"warmup must be auto, full or off, got {self.warmup!r}")
        for name in ("shutdown_grace_s", "header_read_timeout_s", "body_read_timeout_s",
                     "keep_alive_timeout_s", "stream_stall_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (v >= 0 if name == "shutdown_grace_s"
                                                       else v > 0) or v == float("inf"):
                raise ValueError(f"{name} must be a finite number "
                                 f"{'>= 0' if name == 'shutdown_grace_s' else '> 0'}, got {v!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {self.max_connections!r}")
        if self.tool_call_parser is not None:
            from server.tools import PARSERS
            if self.tool_call_parser not in PARSERS:
                raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got "
                                 f"{self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
