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


def load_adapter(name: str, path: str, model_cfg: ModelConfig,
                 max_rank: int | None = None, dtype=None) -> LoraAdapter:
    """A PEFT directory (adapter_config.json + adapter_model.safetensors) or an Orbax one.
    A rank above max_rank (None: any) is refused while reading, before padding; with dtype
    (the serving dtype), weights beyond its range are refused too."""
    if not os.path.exists(path):
        raise AdapterError(f"adapter path {path!r} does not exist")
    if is_orbax_dir(path):
        return load_orbax(name, path, model_cfg, max_rank, dtype)
    return load_peft(name, path, model_cfg, max_rank, dtype)


class AdapterLimitError(AdapterError):
    """Registering one more adapter would pass a cap on the store (`limit`: "count" or
    "host_bytes"); unloading adapters makes room."""

    def __init__(self, message: str, *, limit: str, cap: int, current: int, needed: int):
        super().__init__(message)
        self.limit = limit        # "count" | "host_bytes"
        self.cap = cap
        self.current = current    # adapters (count) or their host bytes, before this one
        self.needed = needed      # 1 (count) or this adapter's host bytes


class LoraStore:
    def __init__(self, model_cfg: ModelConfig, layout: PageLayout, max_pages: int, dtype=None):
        self.model_cfg = model_cfg
        self.layout = layout
        self.max_pages = max_pages          # pages one adapter may take (the pool, or the cap)
        # The dtype adapters are served in (the KV pool's: their pages live there); weights
        # loaded from files must fit its range. None: checked finite as float32 only.
        self.dtype = dtype
        # Caps on what the store holds (None: none); adapters registered before a cap is set
        # stay, but count toward it.
        self.max_adapters: int | None = None
        self.max_host_bytes: int | None = None
        self._adapters: dict[str, LoraAdapter] = {}
        self._num_bytes = 0                 # host bytes of the registered adapters' arrays
        self._lock = threading.Lock()       # add/remove may come from a server thread

    @property
    def num_bytes(self) -> int:
        """Host memory the registered adapters' arrays take."""
        return self._num_bytes

    def check_room(self, num_bytes: int = 0) -> None:
        """AdapterLimitError when one more adapter (of `num_bytes`, 0: not yet known) would
        pass a cap. `add` checks before reading files (count) and again once the size is known."""
        if self.max_adapters is not None and len(self._adapters) + 1 > self.max_adapters:
            raise AdapterLimitError(
                f"{len(self._adapters)} adapters are registered, the cap is {self.max_adapters}",
                limit="count", cap=self.max_adapters, current=len(self._adapters), needed=1)
        if (self.max_host_bytes is not None and num_bytes
                and self._num_bytes + num_bytes > self.max_host_bytes):
            raise AdapterLimitError(
                f"registered adapters take {self._num_bytes} bytes of host memory; this one "
                f"({num_bytes} bytes) would pass the cap of {self.max_host_bytes}",
                limit="host_bytes", cap=self.max_host_bytes, current=self._num_bytes,
                needed=num_bytes)

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
        self.check_room()
        adapter = (source if isinstance(source, LoraAdapter) else
                   load_adapter(name, source, self.model_cfg, self.layout.max_rank, self.dtype))
        adapter.name = name
        self.validate(adapter)
        with self._lock:
            if name in self._adapters:
                raise ValueError(f"adapter {name!r} is already registered (remove it first)")
            self.check_room(adapter.num_bytes)
            self._adapters[name] = adapter
            self._num_bytes += adapter.num_bytes
        return adapter

    def remove(self, name: str) -> None:
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise KeyError(f"unknown adapter {name!r}")
            self._num_bytes -= adapter.num_bytes

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
