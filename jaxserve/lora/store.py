"""The host adapter store: every registered adapter, in host memory (numpy), by name.

A rank-8 adapter on q,k,v,o of the 135M default model is ~3.7 MB in float32 (~10 MB on all seven
projections), so a thousand take a few GB of host RAM. The device holds only the ones the batch needs (`scheduler.AdapterCache` decides which,
`jaxserve.lora.runtime` copies them into pool pages).
"""
from __future__ import annotations

import os
import threading

from jaxserve.config import ModelConfig
from jaxserve.lora.adapter import AdapterError, LoraAdapter, load_peft
from jaxserve.lora.orbax_io import is_orbax_dir, load_orbax
from jaxserve.lora.pool import PageLayout


def load_adapter(name: str, path: str, model_cfg: ModelConfig) -> LoraAdapter:
    """A PEFT directory (adapter_config.json + adapter_model.safetensors) or an Orbax one."""
    if not os.path.exists(path):
        raise AdapterError(f"adapter path {path!r} does not exist")
    if is_orbax_dir(path):
        return load_orbax(name, path, model_cfg)
    return load_peft(name, path, model_cfg)


class LoraStore:
    def __init__(self, model_cfg: ModelConfig, layout: PageLayout, max_pages: int):
        self.model_cfg = model_cfg
        self.layout = layout
        self.max_pages = max_pages          # pages one adapter may take (the pool, or the cap)
        self._adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()       # add/remove may come from a server thread

    def validate(self, adapter: LoraAdapter) -> None:
        if adapter.max_rank > self.layout.max_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.max_rank}, above "
                               f"max_lora_rank={self.layout.max_rank}")
        n = self.layout.num_pages(adapter)
        if n > self.max_pages:
            raise AdapterError(f"adapter {adapter.name!r} needs {n} pages, only {self.max_pages} "
                               "can hold adapters")

    def add(self, name: str, source: str | LoraAdapter) -> LoraAdapter:
        if not name or not isinstance(name, str):
            raise ValueError("adapter name must be a non-empty string")
        adapter = source if isinstance(source, LoraAdapter) else load_adapter(name, source, self.model_cfg)
        adapter.name = name
        self.validate(adapter)
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} is already registered (remove it first)")
            self._adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise KeyError(f"unknown adapter {name!r}")

    def __contains__(self, name) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def get(self, name: str) -> LoraAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise KeyError(f"unknown adapter {name!r}") from None

    def pages_needed(self, name: str) -> int:
        return self.layout.num_pages(self.get(name))

    def packed(self, name: str, num_pages: int | None = None):
        """Page contents [L, pages, page_elems] (zero-padded to `num_pages`), packed per load
        (not kept: it would double the host footprint of thousands of adapters, and packing is
        a memcpy)."""
        return self.layout.pack(self.get(name), num_pages)
