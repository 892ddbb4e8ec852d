"""The engine's CPU attention kernel: `paged_attention.c`, compiled on first use and called with ctypes.

On the CPU the decode step is memory-bound: each step reads every cached key and value once. The torch
reference gathers the used blocks into a new tensor first, so it reads the cache, writes a copy and reads
that again. The C kernel reads each block in place through the block table, once for all the query heads
of a KV head, which is what PagedAttention's GPU kernel does too (chapter 6).

The library is built with the system C compiler into `$LLMINFER_CACHE/kernels` (default
`~/.cache/llminfer/kernels`), named by a hash of the source, the flags and the CPU, so an edit or another
machine rebuilds it. Without OpenMP (Apple's clang) it is built single-threaded. Without a compiler, or with
`LLMINFER_CPU_KERNEL=0`, `supports()` is False and the engine keeps the torch reference. The cache may be
fp32 or quantized (`llminfer.kv.quantized`: int8 or fp8 codes and a scale per row); each format is its own
build of the same source.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llminfer.environment import cache_root
from llminfer.kv.quantized import head_dim_of

SOURCE = Path(__file__).with_name("paged_attention.c")
# -ffast-math lets gcc vectorise expf (glibc's libmvec) and reorder the dot-product sums. It is given to
# the compile step only: linked with -ffast-math, gcc 12 would add crtfastmath.o, which switches the whole
# process to flush-to-zero when the library loads.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c11", "-Wall"]
LINK_FLAGS = ["-shared", "-lm"]
# (compile, link) flags: OpenMP threads if the compiler has OpenMP, else one thread.
THREADING = [(["-fopenmp"], ["-fopenmp"]), (["-Wno-unknown-pragmas"], [])]

# The cache's element type -> the kernel's KV_FORMAT.
KV_FORMATS = {torch.float32: 0, torch.int8: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}

_libraries: dict[tuple[int, int, int], ctypes.CDLL] = {}
_failure: str | None = None


def _cpu_name() -> str:
    """The CPU's model and instruction-set flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def compiler_path() -> str | None:
    """The C compiler: $CC, else cc or gcc on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """Where built libraries are kept: $LLMINFER_CACHE/kernels, default ~/.cache/llminfer/kernels."""
    return cache_root() / "kernels"


def _build(compiler: str, defines: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        obj, lib = Path(scratch) / "kernel.o", Path(scratch) / target.name
        for compile_threads, link_threads in THREADING:
            try:
                subprocess.run([compiler, *COMPILE_FLAGS, *compile_threads, *defines, "-c", str(SOURCE), "-o",
                                str(obj)], check=True, capture_output=True, text=True)
                subprocess.run([compiler, str(obj), *LINK_FLAGS, *link_threads, "-o", str(lib)], check=True,
                               capture_output=True, text=True)
                break
            except subprocess.CalledProcessError:
                if link_threads is THREADING[-1][1]:
                    raise
        os.replace(lib, target)   # atomic: a process building at the same time never loads half a file


def _switched_off() -> bool:
    return os.environ.get("LLMINFER_CPU_KERNEL", "1") == "0"


def _give_up(reason: str) -> None:
    """Remember why no library can be built here, and say so once."""
    global _failure
    _failure = reason
    warnings.warn(f"llminfer: no CPU attention kernel ({reason}); using the torch reference", stacklevel=3)


def load(head_dim: int, group: int, kv_dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The kernel library for this head_dim, GQA group and cache element type, built if needed; None (and
    one warning) when no library can be built here."""
    kv_format = KV_FORMATS[kv_dtype]
    if (head_dim, group, kv_format) in _libraries:
        return _libraries[head_dim, group, kv_format]
    if _failure is not None or _switched_off():
        return None
    compiler = compiler_path()
    if compiler is None:
        return _give_up("no C compiler found (set CC)")
    defines = [f"-DHEAD_DIM={head_dim}", f"-DGROUP={group}", f"-DKV_FORMAT={kv_format}"]
    recipe = [SOURCE.read_text(), str(compiler), *COMPILE_FLAGS, *LINK_FLAGS, repr(THREADING), *defines, _cpu_name(),
              platform.machine()]
    key = hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]
    target = cache_dir() / f"paged_attention-d{head_dim}-g{group}-f{kv_format}-{key}.so"
    try:
        if not target.exists():
            _build(compiler, defines, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        return _give_up(f"building {SOURCE.name} failed: {detail.strip()[-500:]}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.llminfer_paged_attention.argtypes = [ptr] * 7 + [i64] * 5 + [ctypes.c_float, ctypes.c_int]
    library.llminfer_paged_attention.restype = ctypes.c_int
    _libraries[head_dim, group, kv_format] = library
    return library


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the kernel runs these tensors here: fp32 queries on the CPU over an fp32 or quantized cache,
    and a library builds for the shape."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype not in KV_FORMATS:
        return False
    if q.dim() != 3 or k_cache.dim() != 4 or q.shape[1] % k_cache.shape[2] or head_dim_of(k_cache) != q.shape[2]:
        return False
    return load(q.shape[2], q.shape[1] // k_cache.shape[2], k_cache.dtype) is not None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here (switched off, no compiler, a failed build), or None."""
    if _failure is not None:
        return _failure
    if _switched_off():
        return "disabled by LLMINFER_CPU_KERNEL=0"
    if compiler_path() is None:
        return "no C compiler found (set CC)"
    return None


@dataclass(frozen=True)
class Rows:
    """Which cached keys each row of q attends to, converted to the kernel's types and checked: row r sees the
    first `row_len[r]` tokens of sequence `row_seq[r]`, whose blocks are `tables[row_seq[r]]`."""

    tables: torch.Tensor    # int32 [num_seqs, max_blocks]
    row_seq: torch.Tensor   # int64 [rows]
    row_len: torch.Tensor   # int64 [rows]


def prepare_rows(block_tables: torch.Tensor, row_seq: torch.Tensor, row_len: torch.Tensor,
                 block_size: int) -> Rows:
    """Convert and check the rows once; a step's layers all attend with the same ones."""
    rows = Rows(block_tables.to(torch.int32).contiguous(), row_seq.to(torch.int64).contiguous(),
                row_len.to(torch.int64).contiguous())
    if rows.row_seq.numel():
        if int(rows.row_seq.min()) < 0 or int(rows.row_seq.max()) >= rows.tables.shape[0]:
            raise ValueError(f"row_seq must name one of the {rows.tables.shape[0]} block tables, got "
                             f"{int(rows.row_seq.min())}..{int(rows.row_seq.max())}")
        if int(rows.row_len.min()) < 1 or int(rows.row_len.max()) > rows.tables.shape[1] * block_size:
            raise ValueError(f"row lengths must lie in 1..{rows.tables.shape[1] * block_size}, got "
                             f"{int(rows.row_len.min())}..{int(rows.row_len.max())}")
    return rows


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         row_seq: torch.Tensor, row_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Row r of q [rows, heads, head_dim] attends over the first row_len[r] cached tokens of sequence row_seq[r].

    fp32 CPU queries; the caches are [blocks, block_size, kv_heads, head_dim] (fp32) or quantized and must already hold
    every key a row sees. Decode: one row per sequence, row_len = seq_len. Prefill: a row per new token,
    row_len = its position + 1.
    """
    return attend_rows(q, k_cache, v_cache, prepare_rows(block_tables, row_seq, row_len, k_cache.shape[1]), scale)


def attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: Rows,
                scale: float) -> torch.Tensor:
    """`paged_attention_rows` with rows already prepared (`prepare_rows`)."""
    num_rows, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    for name, t, dtypes in (("q", q, (torch.float32,)), ("k_cache", k_cache, KV_FORMATS),
                            ("v_cache", v_cache, (k_cache.dtype,))):
        if t.dtype not in dtypes or t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor of {' or '.join(map(str, dtypes))}, got {t.dtype} "
                             f"on {t.device}")
    if num_heads % num_kv_heads or k_cache.shape != v_cache.shape or head_dim_of(k_cache) != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if rows.row_seq.shape[0] != num_rows:
        raise ValueError(f"q has {num_rows} rows but the row arrays describe {rows.row_seq.shape[0]}")
    library = load(head_dim, num_heads // num_kv_heads, k_cache.dtype)
    if library is None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {unavailable_reason()}")
    if num_rows == 0:
        return torch.empty_like(q)
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    out = torch.empty_like(q)
    status = library.llminfer_paged_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), rows.tables.data_ptr(), rows.row_seq.data_ptr(),
        rows.row_len.data_ptr(), out.data_ptr(), num_rows, num_kv_heads, block_size, num_blocks,
        rows.tables.shape[1], scale, torch.get_num_threads())
    if status == 2:
        raise ValueError(f"a block table names a block outside the cache's {num_blocks} blocks")
    if status != 0:
        raise MemoryError("the CPU attention kernel could not allocate its score buffer")
    return out
