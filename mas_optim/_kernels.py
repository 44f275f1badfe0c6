"""The one-pass CPU kernels of ``csrc/mas_kernels.c``, built at first use with the C compiler.

The MAS step is memory-bound: every pass of torch's ops streams whole tensors. ``mas_kernels.c``
does LocalSgd's update (penalty, weight decay, momentum, the proximal map) in one pass, reading
every tensor once: the ``"fused"`` implementation of :func:`mas_optim.functional.mas_sgd` on the
CPU. It has no dependency but libc, so building it takes
about a second with any C compiler (``$CC``, else ``cc``), and it is called through
:mod:`ctypes` on the tensors' memory, one call per group of tensors. Large tensors are cut into
slices run on torch's own OpenMP team where torch's ``libgomp.so.1`` is loaded (the library is
then built with ``-fopenmp`` and binds to it), else on the calling thread.

Where no compiler works, :func:`load` returns None and :func:`reason` says why; the callers then
take the single-tensor implementation, which computes the same update.

The library is built for the CPU at hand (``-march=native``, else the compiler's baseline)
and cached in ``$MAS_OPTIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/mas_optim``, else
``~/.cache/mas_optim``, under a name that hashes the source, the compiler, the flags and the
instructions they target, so an edited source, another compiler or another CPU type (a home
folder shared by a cluster's nodes) builds anew. It is written atomically and loaded only from a
directory that belongs to this user and that no one else can write to; otherwise it is built
in a fresh private directory instead. A library that fails to load or reports another interface
version is rebuilt, never called.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_SOURCE = Path(__file__).parent / "csrc" / "mas_kernels.c"
_ABI = 5
# No contraction into fused multiply-adds, so each operation rounds like torch's.
_FLAGS = ("-O3", "-std=c99", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
# The vector instructions of the CPU it is built on (AVX2 and AVX-512 where there are: on
# 4M-element tensors the step takes 10-15% less time than with the compiler's baseline SSE2);
# the cache name hashes what they are, so another CPU type sharing the cache builds its own.
_NATIVE = "-march=native"

MOMENTUM, FIRST, NESTEROV, PROXIMAL, DECAY = 1, 2, 4, 8, 16
_DTYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}


class Kernels:
    """Typed entry points of the loaded library. Each works on a group of tensors given by
    their addresses (one C call per group, so the Python cost per tensor is a few attribute
    reads); the caller guarantees :func:`fits`."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fns = {}
        i64, i32, rows = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        for dtype, (suffix, real) in _DTYPES.items():
            sgd = getattr(lib, f"mas_sgd_many_{suffix}")
            sgd.argtypes, sgd.restype = [i64, rows, i32] + [real] * 6, i32
            self._fns[dtype] = sgd
        self._pid = os.getpid()
        # Large tensors are cut into slices on torch's own OpenMP team (see mas_kernels.c);
        # without it, on the calling thread alone.
        self.openmp = bool(lib.mas_kernels_openmp()) and _torch_gnu_openmp()

    def sgd(self, dtype: torch.dtype, rows: Sequence[Sequence[int]],
            scalars: Tuple[float, ...]) -> None:
        """LocalSgd's update, in place, of the tensors whose addresses are in ``rows``: θ, g,
        b (0 without momentum), Ω, θ*, element counts, flags; ``scalars`` = (lr, momentum,
        dampening, weight_decay, coef, gsign). See ``mas_kernels.c``."""
        _check(self._fns[dtype](len(rows[0]), _int64s(rows), self._threads(), *scalars))

    def _threads(self) -> int:
        # libgomp's team does not survive fork(): a forked child (where torch's own parallel
        # ops hang) runs the slices one after the other.
        if not self.openmp or os.getpid() != self._pid:
            return 1
        return torch.get_num_threads()


def _int64s(rows: Sequence[Sequence[int]]) -> "ctypes.Array":
    flat = [v for row in rows for v in row]
    return (ctypes.c_int64 * len(flat))(*flat)


def _check(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"mas_kernels: unknown flags (code {code}); please report this")


def fits(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels can update these tensors in place: all on the CPU, float32 or
    float64 alike, contiguous, the same number of elements, and no two sharing memory (the
    kernels read each input once, so an alias would read values they already wrote)."""
    ts: List[Tensor] = [t for t in tensors if t is not None]
    first = ts[0]
    if first.dtype not in _DTYPES or first.device.type != "cpu":
        return False
    n = first.numel()
    for t in ts:
        if (t.dtype != first.dtype or t.device.type != "cpu" or t.numel() != n
                or not t.is_contiguous() or t.is_sparse or t.is_conj() or t.is_neg()):
            return False
    if n == 0:
        return True
    size = n * first.element_size()
    starts = sorted(t.data_ptr() for t in ts)
    return all(b - a >= size for a, b in zip(starts, starts[1:]))  # no two overlap


def load() -> Optional[Kernels]:
    """The kernels, built on first use; None where they can't be built (see :func:`reason`)."""
    return _loaded()[0]


def reason() -> str:
    """Why :func:`load` returned None ('' if it did not)."""
    return _loaded()[1]


@functools.lru_cache(maxsize=None)
def _loaded() -> Tuple[Optional[Kernels], str]:
    try:
        return _load(), ""
    except _Unavailable as e:
        return None, str(e)


class _Unavailable(Exception):
    pass


def _load() -> Kernels:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise _Unavailable(f"no C compiler ({os.environ.get('CC') or 'cc'}) on PATH")
    failure: Optional[_Unavailable] = None
    for flags in _variants():
        try:
            return _load_built(compiler, flags)
        except _Unavailable as e:
            failure = failure or e
    assert failure is not None
    raise failure


def _variants() -> List[Tuple[str, ...]]:
    """Compiler flags to try in order: for this CPU, then without ``-march=native`` (a compiler
    may not know it); with OpenMP first only where torch's own ``libgomp.so.1`` is loaded,
    which the library then shares."""
    threads = [("-fopenmp",), ()] if _torch_gnu_openmp() else [()]
    return [(*_FLAGS, *native, *omp) for omp in threads for native in ((_NATIVE,), ())]


def _load_built(compiler: str, flags: Sequence[str]) -> Kernels:
    name = _library_name(compiler, flags)
    cache = _cache_dir()
    if cache is not None:
        path = cache / name
        if path.is_file() and _owned_and_private(path):
            lib = _open(path)
            if lib is not None:
                return Kernels(lib, path)
        folder = cache
    else:  # no cache to trust: a private folder, gone once the library is loaded
        folder = Path(tempfile.mkdtemp(prefix="mas_kernels-"))
        path = folder / name
    try:
        _build(compiler, flags, folder, path)
        lib = _open(path)
    finally:
        if cache is None:
            shutil.rmtree(folder, ignore_errors=True)
    if lib is None:
        raise _Unavailable(f"the built library {path} does not load")
    return Kernels(lib, path)


def _library_name(compiler: str, flags: Sequence[str]) -> str:
    """A name that changes with the source, the compiler, its flags and the machine: the
    macros the compiler predefines under those flags say which instructions it targets (with
    ``-march=native``, this CPU's)."""
    version = (_run([compiler, "--version"]).splitlines() or [""])[0]
    target = _run([compiler, *flags, "-dM", "-E", "-x", "c", os.devnull])
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), compiler.encode(), version.encode(),
                                     " ".join(flags).encode(), target.encode(),
                                     platform.machine().encode(),
                                     str(_ABI).encode()])).hexdigest()[:16]
    return f"mas_kernels-{key}.so"


def _gnu_openmp() -> List[str]:
    """The mapped files named ``libgomp.so.1`` (Linux; [] where that can't be read): the ones
    a library built with ``-fopenmp`` binds to by name. Other OpenMP copies (scikit-learn's
    renamed ``libgomp-<hash>.so``, say) don't take part."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps
                           if line.rstrip().endswith("/libgomp.so.1")})
    except OSError:
        return []


def _torch_gnu_openmp() -> bool:
    """True when the one ``libgomp.so.1`` loaded is torch's own: the kernels' OpenMP calls then
    bind to it and share torch's thread team."""
    found = _gnu_openmp()
    return len(found) == 1 and found[0].startswith(os.path.dirname(torch.__file__) + os.sep)


def _run(cmd: List[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _build(compiler: str, flags: Sequence[str], folder: Path, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(_SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise _Unavailable(f"{compiler} failed: {detail[0] if detail else done.returncode}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)  # atomic: another process sees the old file or the whole new one
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"{compiler} could not build {_SOURCE.name}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.mas_kernels_abi
        abi.restype = ctypes.c_int32
        return lib if abi() == _ABI else None
    except (OSError, AttributeError):
        return None


def _cache_dir() -> Optional[Path]:
    """The cache folder (created private), or None if it can't be trusted or created."""
    root = os.environ.get("MAS_OPTIM_CACHE_DIR")
    if root:
        folder = Path(root)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = Path(base) / "mas_optim"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None
    return folder if _owned_and_private(folder) else None


def _owned_and_private(path: Path) -> bool:
    """Owned by this user and writable by no one else (else someone could swap the library)."""
    try:
        st = path.stat()
    except OSError:
        return False
    owner = getattr(os, "getuid", lambda: st.st_uid)()
    return st.st_uid == owner and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
