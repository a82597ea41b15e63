"""Which KV each rank of an instance holds, and the moves a transfer is made of (no torch).

An instance of layout (tp, pp) has ``width * pp`` ranks (``width`` = max(tp, ep): with
ep > tp a stage holds width/tp TP replicas with identical KV). Rank ``r`` is stage
``r // width``; it holds that stage's decoder layers (``engine.stages.stage_layers``) and
the KV heads of TP rank ``(r % width) % tp``: heads split over ranks, each head
replicated on ``tp / num_kv_heads`` ranks when tp > num_kv_heads
(``engine.parallel.head_part`` shards the model the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.model_config import DTYPE_BYTES
from engine.stages import check_boundaries, stage_layers


@dataclass(frozen=True)
class KVShape:
    """The model's KV geometry: what a block of one layer and one head weighs."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def head_block_bytes(self) -> int:
        """K plus V bytes of one block of one layer and one KV head."""
        return 2 * self.block_size * self.head_dim * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class KVLayout:
    """An instance's (tp, pp) layout as far as its KV is concerned."""

    tp: int = 1
    pp: int = 1
    pp_boundaries: tuple[int, ...] | None = None
    width: int | None = None  # ranks per stage; None means tp (no ep > tp replicas)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.width is not None and (self.width < self.tp or self.width % self.tp):
            raise ValueError(f"width={self.width} must be a multiple of tp={self.tp}")
        check_boundaries(self.pp_boundaries, self.pp)
        if self.pp_boundaries is not None:  # a list from YAML/CLI: keep the layout hashable
            object.__setattr__(self, "pp_boundaries", tuple(self.pp_boundaries))

    @property
    def stage_width(self) -> int:
        return self.tp if self.width is None else self.width

    @property
    def world_size(self) -> int:
        return self.stage_width * self.pp

    def check_shape(self, shape: KVShape) -> None:
        """ValueError unless this layout shards ``shape``'s layers and KV heads."""
        stage_layers(shape.num_layers, self.pp, self.pp_boundaries)
        h, tp = shape.num_kv_heads, self.tp
        if (tp <= h and h % tp) or (tp > h and tp % h):
            raise ValueError(
                f"tp={tp} and num_kv_heads={h}: one must divide the other "
                "(KV heads are split evenly or replicated whole)"
            )

    def layers_of(self, rank: int, num_layers: int) -> range:
        """Global decoder layers whose KV ``rank`` holds."""
        self._check_rank(rank)
        return stage_layers(num_layers, self.pp, self.pp_boundaries)[rank // self.stage_width]

    def kv_heads_of(self, rank: int, num_kv_heads: int) -> range:
        """Global KV heads ``rank`` holds (the same as ``engine.parallel.head_part``)."""
        self._check_rank(rank)
        tp_rank = (rank % self.stage_width) % self.tp
        parts = min(self.tp, num_kv_heads)
        index = tp_rank * parts // self.tp
        per = num_kv_heads // parts
        return range(index * per, (index + 1) * per)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a layout of {self.world_size} ranks")


@dataclass(frozen=True)
class Move:
    """One rank-to-rank piece of a transfer: the K and V of ``layers`` x ``kv_heads``
    (global indices) of blocks ``src_blocks`` on the source instance's ``src_rank``,
    written into blocks ``dst_blocks`` (same order, same length) on the destination
    instance's ``dst_rank``."""

    src_rank: int
    dst_rank: int
    layers: range
    kv_heads: range
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.src_blocks) != len(self.dst_blocks):
            raise ValueError(
                f"src_blocks ({len(self.src_blocks)}) and dst_blocks ({len(self.dst_blocks)}) "
                "must have the same length"
            )
        if not self.layers or not self.kv_heads:
            raise ValueError(
                f"a move needs layers and kv_heads, got {self.layers}, {self.kv_heads}"
            )

    def num_bytes(self, shape: KVShape) -> int:
        """K plus V bytes this move carries."""
        return len(self.layers) * len(self.kv_heads) * len(self.src_blocks) * shape.head_block_bytes
