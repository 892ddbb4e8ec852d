"""Figures of KV cache memory: the block pool, the block tables of running requests, and where memory goes.

The drawing functions take a `PoolSnapshot`, a copy of the engine's memory state at one moment, so a
chapter can step the engine on and still draw the step it cared about.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

FREE_COLOR = "white"
CACHED_COLOR = "#d9d9d9"   # free, but still holding a cached prefix (chapter 9)
EMPTY_SLOTS_COLOR = "#f0f0f0"
# One colour per kind of memory, in the order the bars stack.
BREAKDOWN_COLORS = {
    "token states": "#4C72B0",
    "reserved for future tokens": "#DD8452",
    "internal fragmentation": "#C44E52",
    "external fragmentation": "#8172B3",
}


@dataclass
class PoolSnapshot:
    """The block pool and the running requests' block tables at one moment (copied, not shared)."""

    block_size: int
    tables: dict[str, list[int]]   # running request id -> its block table, in the order they started
    num_tokens: dict[str, int]     # running request id -> tokens whose keys and values are in the cache
    ref_counts: list[int]          # per block: how many running requests use it
    cached: list[bool]             # per block: holds a full block registered in the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.ref_counts)

    @property
    def num_used_blocks(self) -> int:
        return sum(1 for count in self.ref_counts if count > 0)


def snapshot(engine) -> PoolSnapshot:
    """Copy an `LLMEngine`'s block pool and its running requests' block tables."""
    pool = engine.pool
    running = engine.scheduler.running
    return PoolSnapshot(
        block_size=pool.block_size,
        tables={seq.request_id: list(seq.block_table) for seq in running},
        num_tokens={seq.request_id: seq.num_computed_tokens for seq in running},
        ref_counts=[block.ref_count for block in pool.blocks],
        cached=[block.block_hash is not None for block in pool.blocks],
    )


def request_colors(request_ids) -> dict[str, tuple]:
    """A distinct colour per request (tab20 cycles after twenty), the same in every figure of a chapter."""
    cmap = plt.get_cmap("tab20")
    return {rid: cmap(i % cmap.N) for i, rid in enumerate(request_ids)}


def block_owners(snap: PoolSnapshot) -> dict[int, list[str]]:
    """Block id -> the running requests whose block tables hold it, oldest first."""
    owners: dict[int, list[str]] = {}
    for rid, table in snap.tables.items():
        for block in table:
            owners.setdefault(block, []).append(rid)
    return owners


def plot_pool(ax, snap: PoolSnapshot, ncols: int = 16, colors: dict | None = None,
              title: str | None = None) -> dict[str, list[Rectangle]]:
    """Every block of the pool as a cell, numbered by block id and coloured by the request that owns it.

    Free blocks are white; free blocks still holding a cached prefix are grey and hatched; a block that
    several requests share gets a thick outline and its reference count. Returns the cells by kind."""
    colors = colors or request_colors(snap.tables)
    owners = block_owners(snap)
    cells: dict[str, list[Rectangle]] = {"used": [], "cached": [], "free": []}
    nrows = -(-snap.num_blocks // ncols)
    for block in range(snap.num_blocks):
        row, col = divmod(block, ncols)
        y = nrows - 1 - row
        if block in owners:
            kind, face, hatch = "used", colors[owners[block][0]], None
        elif snap.cached[block]:
            kind, face, hatch = "cached", CACHED_COLOR, "///"
        else:
            kind, face, hatch = "free", FREE_COLOR, None
        shared = len(owners.get(block, ())) > 1
        cell = Rectangle((col, y), 1, 1, facecolor=face, edgecolor="black", hatch=hatch,
                         linewidth=2.5 if shared else 0.5)
        ax.add_patch(cell)
        cells[kind].append(cell)
        label = f"{block}\n×{len(owners[block])}" if shared else str(block)
        ax.text(col + 0.5, y + 0.5, label, ha="center", va="center", fontsize=6 if ncols <= 20 else 4,
                color="black")
    ax.set_xlim(0, ncols)
    ax.set_ylim(0, nrows)
    ax.set_aspect("equal")
    ax.axis("off")
    counts = Counter(kind for kind, members in cells.items() for _ in members)
    ax.set_title(title or (f"block pool: {counts['used']} of {snap.num_blocks} blocks in use"
                           + (f", {counts['cached']} free but cached" if counts["cached"] else "")), fontsize=9)
    return cells


def plot_block_tables(ax, snap: PoolSnapshot, colors: dict | None = None,
                      title: str | None = None) -> list[Rectangle]:
    """One row per running request: its block table left to right, each cell showing the physical block id,
    shaded as far as the block's slots hold tokens (the last block of a request is usually part empty).
    A block shared with another request is outlined thick. Returns one cell per table entry."""
    colors = colors or request_colors(snap.tables)
    owners = block_owners(snap)
    size = snap.block_size
    width = max((len(table) for table in snap.tables.values()), default=1)
    cells = []
    for row, (rid, table) in enumerate(snap.tables.items()):
        y = len(snap.tables) - 1 - row
        for index, block in enumerate(table):
            filled = min(max(snap.num_tokens[rid] - index * size, 0), size) / size
            ax.add_patch(Rectangle((index, y + 0.1), 1, 0.8, facecolor=EMPTY_SLOTS_COLOR, linewidth=0))
            ax.add_patch(Rectangle((index, y + 0.1), filled, 0.8, facecolor=colors[rid], linewidth=0))
            cell = Rectangle((index, y + 0.1), 1, 0.8, fill=False, edgecolor="black",
                             linewidth=2.5 if len(owners[block]) > 1 else 0.5)
            ax.add_patch(cell)
            ax.text(index + 0.5, y + 0.5, str(block), ha="center", va="center", fontsize=6 if width <= 24 else 4)
            cells.append(cell)
        ax.text(-0.3, y + 0.5, f"{rid} ({snap.num_tokens[rid]} tok)", ha="right", va="center", fontsize=7)
    ax.set_xlim(-0.05, width + 0.05)
    ax.set_ylim(0, max(len(snap.tables), 1))
    ax.set_yticks([])
    ax.set_xticks([i + 0.5 for i in range(width)], [str(i) for i in range(width)], fontsize=6)
    ax.set_xlabel(f"logical block (covers tokens [{size}i, {size}(i+1)))", fontsize=8)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title or f"block tables of the {len(snap.tables)} running requests (block size {size})",
                 fontsize=9)
    return cells


def plot_memory_breakdown(ax, breakdown: dict[str, dict[str, float]], unit: str = "share of held KV memory"):
    """Stacked horizontal bars: for each allocator (a row), its memory split into the kinds of
    `BREAKDOWN_COLORS`, each as a fraction of the row's total. Returns the bar containers."""
    bars = []
    names = list(breakdown)
    left = [0.0] * len(names)
    for kind, color in BREAKDOWN_COLORS.items():
        values = [breakdown[name].get(kind, 0.0) for name in names]
        if not any(values):
            continue
        bars.append(ax.barh(names, values, left=left, color=color, label=kind))
        for y, (start, value) in enumerate(zip(left, values, strict=True)):
            if value >= 0.06:
                ax.text(start + value / 2, y, f"{value:.0%}", ha="center", va="center", fontsize=7, color="white")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlim(0, max(1.0, *left))
    ax.set_xlabel(unit)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return bars
