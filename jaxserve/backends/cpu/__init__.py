"""The CPU backend and its native XLA:CPU kernels (the only package that uses them)."""


def build_kernels() -> int:
    """Build every native kernel library into the cache (the install step; `jaxserve
    build-kernels`); prints what was built or why not. Returns a process exit status."""
    from jaxserve.backends.cpu import native_build
    return native_build.build_all()
