"""Builds of the native XLA:CPU kernels (cpu_attention.cc, cpu_matmul.cc).

Each kernel source is one C++ file (plus the shared header cpu_simd.h), built with the system
C++ compiler (`g++ -O3 -march=native -std=c++17 -shared -fPIC`; `$CXX` overrides g++) into
`$JAXSERVE_CACHE_DIR`, default `~/.cache/jaxserve/kernels/`, as `<name>-<key>.so`, the key hashing
the source and headers, the compiler version, the jaxlib version, the build flags, the FFI include dir and
the CPU's feature flags (the code is built for this CPU). The build goes to a temporary file that
is then renamed into place, so processes building at the same time do not see each other's
partial output. The loaded library's handlers are registered as XLA FFI targets on "cpu".

When: at install time (`make install`, `jaxserve build-kernels`, or
`python -m jaxserve.backends.cpu.native_build`, which builds every library and prints what it
built or why not), so no request waits for a compiler. A process loads the libraries when its
backend is constructed (status()); one whose cache entry is missing builds it then, at start-up,
with a warning.

NativeLibrary.unavailable_reason() / available() never raise: a library is unavailable with
JAXSERVE_CPU_KERNELS=0 (or false/no/off), off the CPU backend, without a compiler, or if the build
or load fails (available() logs the reason once).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = (os.path.join(_HERE, "cpu_simd.h"),)   # included by every kernel source; in the key
_LIBRARIES: dict[str, "NativeLibrary"] = {}      # every NativeLibrary, by name (see libraries())


class NoCompiler(RuntimeError):
    """No C++ compiler on this machine: the native kernels are cleanly unavailable."""


def cache_dir() -> str:
    return os.environ.get("JAXSERVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "kernels")


def compiler() -> str:
    return os.environ.get("CXX") or "g++"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _switched_off() -> str | None:
    flag = os.environ.get("JAXSERVE_CPU_KERNELS", "1").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return f"disabled by JAXSERVE_CPU_KERNELS={flag}"
    return None


def disabled_reason() -> str | None:
    """Why no native kernel may be used in this process (None: they may)."""
    if (reason := _switched_off()) is not None:
        return reason
    try:
        backend = jax.default_backend()
    except Exception as e:           # noqa: BLE001
        return f"no JAX backend ({type(e).__name__}: {e})"
    if backend != "cpu":
        return f"the default JAX backend is {backend!r}, not 'cpu'"
    return None


class NativeLibrary:
    """The C++ file `source`, built into `<cache_dir>/<name>-<key>.so` on first load, whose
    exported FFI handler symbols `targets` {target name: symbol} get registered on the CPU."""

    def __init__(self, name: str, source: str, targets: dict[str, str], what: str,
                 logger: logging.Logger):
        self.name, self.source, self.targets = name, source, dict(targets)
        self.what, self.log = what, logger
        self._lock = threading.Lock()
        self.state: dict = {}        # "lib": the loaded library, or "error": why it is unusable
        self._warned: set[str] = set()
        _LIBRARIES[name] = self

    def build_key(self, cxx: str, include_dir: str) -> str:
        import jaxlib
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 check=True).stdout
        h = hashlib.sha256()
        for path in (self.source, *HEADERS):
            with open(path, "rb") as f:
                h.update(f.read())
        for part in (version, jaxlib.__version__, cpu_flags(), " ".join(FLAGS), include_dir):
            h.update(b"\0" + part.encode())
        return h.hexdigest()[:20]

    def build(self, cxx: str, include_dir: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{self.name}-",
                                   suffix=".so.tmp")
        os.close(fd)
        try:
            cmd = [cxx, *FLAGS, f"-I{include_dir}", f"-I{_HERE}", self.source, "-o", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"build failed ({' '.join(cmd)}):\n{r.stderr[-4000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def ensure_built(self) -> tuple[str, bool]:
        """(path of the built library, whether it was built now). Raises NoCompiler, or the
        build's error. Needs no JAX backend (install time)."""
        cxx = compiler()
        if shutil.which(cxx) is None:
            raise NoCompiler(f"no C++ compiler ({cxx!r} not on PATH)")
        include_dir = jax.ffi.include_dir()
        path = os.path.join(cache_dir(), f"{self.name}-{self.build_key(cxx, include_dir)}.so")
        if os.path.exists(path):
            return path, False
        self.build(cxx, include_dir, path)
        return path, True

    def load(self):
        """The loaded library with its FFI targets registered, or None (reason in
        state['error']). Built if missing and loaded once per process."""
        with self._lock:
            if "lib" in self.state or "error" in self.state:
                return self.state.get("lib")
            try:
                path, built = self.ensure_built()
                if built:
                    self.log.warning("built %s on first use (`jaxserve build-kernels` builds it "
                                     "at install time)", path)
                cxx, include_dir = compiler(), jax.ffi.include_dir()
                try:
                    lib = ctypes.CDLL(path)
                except OSError:      # a damaged cache entry: rebuild it once
                    self.build(cxx, include_dir, path)
                    lib = ctypes.CDLL(path)
                for target, symbol in self.targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                self.state["lib"] = lib
            except Exception as e:   # noqa: BLE001 -- available() must never raise
                self.state["error"] = f"{type(e).__name__}: {e}"
            return self.state.get("lib")

    def unavailable_reason(self) -> str | None:
        """Why available() is False, or None when it is True."""
        reason = disabled_reason()
        if reason is not None:
            return reason
        if self.load() is None:
            return self.state["error"]
        return None

    def available(self) -> bool:
        """Whether the kernels can run here (builds the library on first call)."""
        reason = self.unavailable_reason()
        if reason is not None:
            if reason not in self._warned:
                self._warned.add(reason)
                self.log.warning("%s unavailable (using the XLA path): %s", self.what, reason)
            return False
        return True


def libraries() -> dict[str, NativeLibrary]:
    """Every native library, by name (importing the kernel modules defines them)."""
    from jaxserve.backends.cpu import cpu_attention, cpu_matmul  # noqa: F401
    return dict(sorted(_LIBRARIES.items()))


def status() -> dict[str, str | None]:
    """{library name: why it is unavailable, or None when loaded}. Loads every library (building
    a missing one): call it when the backend is constructed, never inside a step."""
    return {name: lib.unavailable_reason() for name, lib in libraries().items()}


def build_all(out=None) -> int:
    """Build every library into cache_dir() and print one line each: built, cached, or why not.
    0 when each is built or cleanly unavailable (switched off, no compiler); 1 if a build
    failed."""
    out, failed = out or sys.stdout, False
    for name, lib in libraries().items():
        if (reason := _switched_off()) is not None:
            print(f"{name}: not built ({reason})", file=out)
            continue
        t0 = time.perf_counter()
        try:
            path, built = lib.ensure_built()
        except Exception as e:   # noqa: BLE001 -- report every library, then the status
            failed |= not isinstance(e, NoCompiler)
            print(f"{name}: not built ({type(e).__name__}: {e}); the XLA path will be used",
                  file=out)
            continue
        print(f"{name}: built {path} ({time.perf_counter() - t0:.1f} s)" if built else
              f"{name}: cached {path}", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    # Through the package import, so the libraries register in the module cpu_matmul imports.
    from jaxserve.backends.cpu import native_build
    sys.exit(native_build.build_all())
