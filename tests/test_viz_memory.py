"""The memory figures draw what the engine holds: one cell per block, per table entry, per kind of memory."""

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import to_rgba

from llminfer import SamplingParams, load_model
from llminfer.engine import LLMEngine
from llminfer.viz.memory import (
    CACHED_COLOR,
    plot_block_tables,
    plot_memory_breakdown,
    plot_pool,
    request_colors,
    snapshot,
)

SYSTEM = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model("tiny-shakespeare", device="cpu", dtype=torch.float32)


@pytest.fixture
def axes():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def running_engine(model_and_tokenizer, prompts, steps: int, **kwargs) -> LLMEngine:
    engine = LLMEngine(*model_and_tokenizer, block_size=4, num_kv_blocks=40, max_model_len=128, **kwargs)
    for prompt in prompts:
        engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    return engine


def test_snapshot_copies_the_engine_state(model_and_tokenizer):
    engine = running_engine(model_and_tokenizer, ["ROMEO:", "JULIET:\nO Romeo", "KING"], steps=3)
    snap = snapshot(engine)
    assert snap.num_blocks == 40 and snap.num_used_blocks == engine.pool.num_used_blocks
    for seq in engine.scheduler.running:
        assert snap.tables[seq.request_id] == seq.block_table
        assert snap.num_tokens[seq.request_id] == seq.num_computed_tokens
    engine.step()                                  # the engine moves on; the snapshot does not
    assert any(len(seq.block_table) != len(snap.tables[seq.request_id]) or
               seq.num_computed_tokens != snap.num_tokens[seq.request_id] for seq in engine.scheduler.running)


def test_pool_draws_one_cell_per_block_coloured_by_owner(model_and_tokenizer, axes):
    engine = running_engine(model_and_tokenizer, ["ROMEO:", "JULIET:\nO Romeo", "KING"], steps=5,
                            enable_prefix_caching=False)
    snap = snapshot(engine)
    colors = request_colors(snap.tables)
    cells = plot_pool(axes, snap, ncols=8, colors=colors)
    assert len(cells["used"]) == engine.pool.num_used_blocks > 0
    assert len(cells["used"]) + len(cells["free"]) == engine.pool.num_blocks and not cells["cached"]
    owner = {block: rid for rid, table in snap.tables.items() for block in table}
    used_faces = sorted(tuple(cell.get_facecolor()) for cell in cells["used"])
    want = sorted(tuple(to_rgba(colors[owner[block]])) for block in owner)
    assert used_faces == want


def test_tables_draw_one_cell_per_entry_and_mark_shared_blocks(model_and_tokenizer, axes):
    engine = LLMEngine(*model_and_tokenizer, block_size=4, num_kv_blocks=40, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=10)
    engine.add_request("a", SYSTEM + "ROMEO:", params)
    engine.step()                                  # a's prompt blocks enter the prefix cache
    engine.add_request("b", SYSTEM + "JULIET:", params)
    engine.step()
    snap = snapshot(engine)
    shared = set(snap.tables["a"]) & set(snap.tables["b"])
    assert shared, "the second request should reuse the first one's prompt blocks"
    cells = plot_block_tables(axes, snap)
    assert len(cells) == sum(len(table) for table in snap.tables.values())
    thick = [cell for cell in cells if cell.get_linewidth() > 1]
    assert len(thick) == 2 * len(shared)           # each shared block outlined in both tables


def test_pool_shows_free_but_cached_blocks(model_and_tokenizer, axes):
    engine = running_engine(model_and_tokenizer, [SYSTEM], steps=25)
    assert not engine.has_unfinished_requests()
    snap = snapshot(engine)
    cells = plot_pool(axes, snap, ncols=8)
    assert not cells["used"] and len(cells["cached"]) == len(engine.pool.cached) > 0
    assert all(cell.get_facecolor() == to_rgba(CACHED_COLOR) for cell in cells["cached"])


def test_breakdown_bars_stack_to_each_row_total(axes):
    breakdown = {"contiguous": {"token states": 0.25, "reserved for future tokens": 0.25,
                                "internal fragmentation": 0.5},
                 "paged": {"token states": 0.96, "internal fragmentation": 0.04}}
    bars = plot_memory_breakdown(axes, breakdown)
    assert len(bars) == 3                          # kinds with no value anywhere are not drawn
    for row in range(2):
        assert max(bar.patches[row].get_x() + bar.patches[row].get_width() for bar in bars) == pytest.approx(1.0)
