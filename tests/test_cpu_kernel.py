"""The engine's C attention kernel (`llminfer.kernels.cpu`) agrees with the torch references.

It is built with the machine's C compiler on first use. Its cases are the Triton kernels' odd shapes
(head_dim 24/48/80, groups of 1, 3 and 4 query heads, blocks of 4, 8 and 16 tokens, shuffled block
tables padded with -1), plus the tiny model's own shape, and caches whose unused slots hold NaN: the
kernel must never read a slot past a row's length.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close
from test_kernels import DECODE_CASES, PREFILL_CASES, decode_args, dense_attention, make_batch, prefill_args

from llminfer.kernels import (
    cpu,
    paged_attention_decode,
    paged_attention_decode_reference,
    paged_attention_prefill,
    paged_attention_prefill_reference,
)

pytestmark = pytest.mark.skipif(not cpu.supports(torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 8)),
                                reason=f"the CPU kernel cannot be built here: {cpu.unavailable_reason()}")

SHAPES = {**{f"decode-{k}": ([n - 1 for n in v[0]], [1] * len(v[0]), *v[1:5]) for k, v in DECODE_CASES.items()},
          **{f"prefill-{k}": v[:6] for k, v in PREFILL_CASES.items()},
          "tiny-model": ([0, 15, 16, 100, 3], [40, 1, 1, 1, 20], 2, 4, 32, 16)}


def poison_unused_slots(batch) -> None:
    """Fill every cache slot that holds none of the batch's tokens with NaN, in place."""
    num_blocks, block_size = batch.k_cache.shape[:2]
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for table, n in zip(batch.block_tables.tolist(), batch.seq_lens.tolist()):
        positions = torch.arange(n)
        used[torch.tensor(table)[positions // block_size], positions % block_size] = True
    batch.k_cache[~used] = float("nan")
    batch.v_cache[~used] = float("nan")


def rows_of(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's sequence and how many keys it sees (its position + 1), built with Python lists."""
    row_seq, row_len = [], []
    for seq, (new, n) in enumerate(zip(batch.num_new, batch.seq_lens.tolist())):
        row_seq += [seq] * new
        row_len += range(n - new + 1, n + 1)
    return torch.tensor(row_seq), torch.tensor(row_len)


@pytest.mark.parametrize("case", SHAPES)
def test_rows_match_dense_attention_and_never_read_unused_slots(case):
    cached, new, kv_heads, group, head_dim, block_size = SHAPES[case]
    batch = make_batch(cached, new, kv_heads, group, head_dim, block_size, torch.float32)
    expected = dense_attention(batch)
    poison_unused_slots(batch)
    row_seq, row_len = rows_of(batch)
    out = cpu.paged_attention_rows(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, row_seq, row_len,
                                   batch.scale)
    assert_close(out, expected)


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_dispatches_to_the_kernel_and_matches_the_reference(case, monkeypatch):
    lens, kv_heads, group, head_dim, block_size, _ = DECODE_CASES[case]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, torch.float32)
    expected = paged_attention_decode_reference(*decode_args(batch))
    calls, attend = [], cpu.attend_rows
    monkeypatch.setattr(cpu, "attend_rows", lambda *a: calls.append(1) or attend(*a))
    assert_close(paged_attention_decode(*decode_args(batch)), expected)
    assert calls == [1]


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_dispatches_to_the_kernel_and_matches_the_reference(case, monkeypatch):
    batch = make_batch(*PREFILL_CASES[case][:6], torch.float32)
    expected = paged_attention_prefill_reference(*prefill_args(batch))
    calls, attend = [], cpu.attend_rows
    monkeypatch.setattr(cpu, "attend_rows", lambda *a: calls.append(1) or attend(*a))
    assert_close(paged_attention_prefill(*prefill_args(batch)), expected)
    assert calls == [1]


def test_a_steps_rows_are_prepared_once_for_all_layers(monkeypatch):
    lens, kv_heads, group, head_dim, block_size, _ = DECODE_CASES[next(iter(DECODE_CASES))]
    batch = make_batch([n - 1 for n in lens], [1] * len(lens), kv_heads, group, head_dim, block_size, torch.float32)
    args = decode_args(batch)
    prepared, prepare = [], cpu.prepare_rows
    monkeypatch.setattr(cpu, "prepare_rows", lambda *a: prepared.append(1) or prepare(*a))
    memo = {}   # a step's AttentionMetadata.memo: three layers of one step share it
    for _ in range(3):
        assert_close(paged_attention_decode(*args, memo=memo), paged_attention_decode_reference(*args))
    assert prepared == [1]
    paged_attention_decode(*args, memo={})   # the next step's metadata: prepared again
    paged_attention_decode(*args)            # no memo (a direct call): prepared every time
    assert prepared == [1, 1, 1]


def test_fp16_and_bf16_keep_the_reference():
    q, cache = torch.zeros(1, 2, 8, dtype=torch.float16), torch.zeros(1, 4, 1, 8, dtype=torch.float16)
    assert not cpu.supports(q, cache)
    assert not cpu.supports(q.bfloat16(), cache.bfloat16())
    with pytest.raises(ValueError, match="float32"):
        cpu.paged_attention_rows(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1),
                                 torch.ones(1), 1.0)


def test_the_result_does_not_depend_on_the_thread_count():
    cached, new, kv_heads, group, head_dim, block_size = SHAPES["tiny-model"]
    batch = make_batch(cached, new, kv_heads, group, head_dim, block_size, torch.float32)
    row_seq, row_len = rows_of(batch)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, row_seq, row_len, batch.scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.paged_attention_rows(*args)
        torch.set_num_threads(2)
        two = cpu.paged_attention_rows(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)   # every row is one task: no reduction across threads


def test_bad_rows_and_tables_are_refused_with_the_values():
    batch = make_batch([4], [1], 1, 2, 8, 4, torch.float32)
    args = (batch.q, batch.k_cache, batch.v_cache)
    # The table is 3 blocks of 4 wide (make_batch pads it with a -1 past the 2 blocks in use).
    with pytest.raises(ValueError, match=r"row lengths must lie in 1\.\.12, got 0\.\.0"):
        cpu.paged_attention_rows(*args, batch.block_tables, torch.zeros(1), torch.zeros(1), batch.scale)
    with pytest.raises(ValueError, match=r"got 13\.\.13"):
        cpu.paged_attention_rows(*args, batch.block_tables, torch.zeros(1), torch.full((1,), 13), batch.scale)
    with pytest.raises(ValueError, match="outside the cache's"):   # reaches the -1 padding
        cpu.paged_attention_rows(*args, batch.block_tables, torch.zeros(1), torch.full((1,), 9), batch.scale)
    with pytest.raises(ValueError, match=r"one of the 1 block tables, got 1\.\.1"):
        cpu.paged_attention_rows(*args, batch.block_tables, torch.ones(1), torch.full((1,), 5), batch.scale)
    outside = torch.tensor([[0, batch.k_cache.shape[0]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="outside the cache's"):
        cpu.paged_attention_rows(*args, outside, torch.zeros(1), torch.full((1,), 5), batch.scale)
    with pytest.raises(ValueError, match="does not fit"):
        cpu.paged_attention_rows(batch.q[:, :, :4], *args[1:], batch.block_tables, torch.zeros(1), torch.ones(1),
                                 batch.scale)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


PROBE = """
import warnings, torch
warnings.simplefilter("always")
from llminfer.kernels import cpu, paged_attention_decode, paged_attention_decode_reference
q, k, v = torch.randn(1, 2, 8), torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
args = (q, k, v, torch.tensor([[1, 0]], dtype=torch.int32), torch.tensor([6]), 8 ** -0.5, 6)
assert torch.allclose(paged_attention_decode(*args), paged_attention_decode_reference(*args), atol=1e-6)
print("supported", cpu.supports(q, k), "|", cpu.unavailable_reason())
"""


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path):
    done = run_python(PROBE, CC=str(tmp_path / "no-such-cc"), LLMINFER_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "supported False" in done.stdout and "no-such-cc" in done.stdout
    assert "using the torch reference" in done.stderr   # one warning names the fallback


def test_with_no_compiler_on_the_path_the_reference_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    done = run_python(PROBE, PATH=str(tmp_path), LLMINFER_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "supported False | no C compiler found (set CC)" in done.stdout
    assert "using the torch reference" in done.stderr


def test_the_kernel_can_be_switched_off(tmp_path):
    done = run_python(PROBE, LLMINFER_CPU_KERNEL="0", LLMINFER_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "supported False | disabled by LLMINFER_CPU_KERNEL=0" in done.stdout
    assert not list(tmp_path.rglob("*.so"))


def test_a_fresh_cache_builds_one_library_per_shape(tmp_path):
    done = run_python(PROBE, LLMINFER_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "supported True" in done.stdout
    assert [p.name.split("-")[1:3] for p in (tmp_path / "kernels").glob("*.so")] == [["d8", "g2"]]
