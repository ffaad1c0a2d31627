"""What DQRM quantization-aware training simulates: ``QATConfig``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dqrm_lightning.quant.fake_quant import SUPPORTED_BITS, Mode, Ste

MLPGranularity = Literal["per_row", "per_tensor"]
BiasMode = Literal["fp32", "reference"]
ScaleTracking = Literal["periodic", "exact"]
ScaleRefresh = Literal["incremental", "full"]
EmbeddingGranularity = Literal["per_table", "per_row"]
BUDGET_BITS = (8, 4, 2)  # candidate bits of the size-budget policy, widest first
Rounding = Literal["nearest", "stochastic"]
ScaleLearning = Literal["none", "lsq"]


@dataclass
class QATConfig:
    """DQRM quantization-aware training settings, validated when built.

    The defaults quantize nothing; the paper's recommended semantics (symmetric per-table INT4 embeddings, scale
    refreshed every 200 optimizer steps, identity straight-through gradient, MLP in FP32) are
    ``QATConfig(embedding_bits=4)``. The fields are the ``--qat.*`` options of the ``dqrm`` command and the keys of
    ``configs/qat/*.yaml``.

    Args:
        embedding_bits: default bit width of every table (2, 4, 8, 16), or ``None`` for FP32 embeddings.
        embedding_bits_per_table: overrides by feature name, e.g. ``{"C3": 2, "C9": 8}`` (mixed precision); a table
            several features share is named by its table name, or by any of its features (one bit width per table).
            The names are checked against the model's features when QAT is prepared (:meth:`table_overrides`).
        embedding_bits_by_rows: size policy ``[[min_rows, bits], ...]``: a table gets the bits of the largest
            ``min_rows`` it reaches (applied before ``embedding_bits_per_table``).
        embedding_mode: ``symmetric`` (reference code) or ``asymmetric`` (min/max grid, paper Fig. 2).
        embedding_granularity: ``per_table`` (one grid per table, refreshed every ``scale_period`` steps: the paper)
            or ``per_row`` (every row has its own float16 scale and bias from its own min/max, FBGEMM's row-wise
            INT-N format; stateless, so ``scale_period`` and ``scale_tracking`` do not affect these tables).
        size_budget: a fraction of the FP32 bytes of the embedding tables (MLPs excluded: their bits are
            ``mlp_bits``) that the stored tables, codes plus scales and biases, must fit in, e.g. ``0.125``; ``None``
            (default) for no budget. The bits then come from a greedy size policy (:meth:`assign_bits`):
            every table not named in ``embedding_bits_per_table`` starts at ``embedding_bits`` (8 when ``None``),
            and the table whose next step down in {8, 4, 2} saves the most bytes is lowered until the tables fit.
        ste: straight-through gradient: ``identity`` (reference) or ``clipped``.
        scale_period: refresh each table's scale at step 0 and then every ``scale_period`` optimizer steps
            (1 = the paper's "naive" baseline, refreshed every step).
        period_off_by_one: reproduce the reference code's cadence (refresh every ``scale_period + 1`` steps).
        scale_tracking: ``periodic`` (the paper) or ``exact`` (keep each table's max|W| up to date after every step
            from the touched rows; a full pass only when the row holding the maximum shrank).
        scale_refresh: how a periodic refresh finds the table extrema, both exactly: ``incremental`` (default:
            rescans only the blocks of 16 rows that training looked up since the last refresh,
            :class:`~dqrm_lightning.quant.table_extrema.BlockExtrema`; valid because only looked-up rows change; it
            keeps 2 values per block in the table's dtype, about 17 MB for FP32 Kaggle tables; one refresh of the
            Kaggle tables measured 85 ms vs 258 ms for a full pass, benchmarks/README.md) or ``full`` (a full pass
            over every table each time, the paper's procedure).
        warmup_epochs: train FP32 for this many epochs before quantization starts (paper supp. Table 8).
        mlp_bits: bit width of MLP weights (4 or 8), or ``None`` for FP32 MLPs.
        mlp_granularity: ``per_row`` (one scale per output neuron) or ``per_tensor`` (ablation).
        mlp_bias: ``fp32`` (default) or ``reference`` (bias quantized with the row scale and the weight bits).
        mlp_activation_bits: also fake-quantize each MLP layer's input at these bits (4, 8 or 16; running max
            scale), or ``None`` (default, FP32 activations as in every paper run).
        rounding: embedding codes in training forwards: ``nearest`` (default) or ``stochastic``
            (``floor(x / s + u)``, ``u ~ U[0, 1)``: unbiased). Evaluation and export always round to nearest.
        scale_learning: ``none`` (default: scales from the table extrema, refreshed every ``scale_period`` steps) or
            ``lsq``: each table's scale (and, asymmetric, its offset) is a parameter trained by the dense optimizer
            with the LSQ / LSQ+ gradient, initialised from the table extrema at the first quantized step and never
            refreshed again (``scale_period`` then only sets that first grid).
        lsq_lr_scale: the learned scales' learning rate as a multiple of the dense learning rate.

    Raises:
        ValueError: naming the first bad field in backticks, with the allowed values and the value received.

    Example::

        config = QATConfig(embedding_bits=4, mlp_bits=4)  # the paper's whole-model INT4
    """

    embedding_bits: int | None = None
    embedding_bits_per_table: dict[str, int] | None = None  # None: no overrides (stored as {})
    embedding_bits_by_rows: list[list[int]] | None = None  # None: no size policy (stored as [])
    embedding_mode: Mode = "symmetric"
    embedding_granularity: EmbeddingGranularity = "per_table"
    size_budget: float | None = None
    ste: Ste = "identity"
    scale_period: int = 200
    period_off_by_one: bool = False
    scale_tracking: ScaleTracking = "periodic"
    scale_refresh: ScaleRefresh = "incremental"
    warmup_epochs: int = 0
    mlp_bits: int | None = None
    mlp_granularity: MLPGranularity = "per_row"
    mlp_bias: BiasMode = "fp32"
    mlp_activation_bits: int | None = None
    rounding: Rounding = "nearest"
    scale_learning: ScaleLearning = "none"
    lsq_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        self.embedding_bits_per_table = dict(self.embedding_bits_per_table or {})
        self.embedding_bits_by_rows = [list(rule) for rule in self.embedding_bits_by_rows or []]
        self._check_embeddings()
        self._check_schedule()
        self._check_mlp()
        self._check_training_grid()

    def _check_embeddings(self) -> None:
        assert self.embedding_bits_per_table is not None  # __post_init__ stores None as {}
        assert self.embedding_bits_by_rows is not None  # and None as []
        if not _is_bits(self.embedding_bits, allow_none=True):
            raise ValueError(f"`embedding_bits` must be one of {SUPPORTED_BITS} or null, got {self.embedding_bits!r}")
        for feature, value in self.embedding_bits_per_table.items():
            if not isinstance(feature, str) or not feature:
                raise ValueError(f"`embedding_bits_per_table` keys are feature names, got {feature!r}")
            if not _is_bits(value):
                raise ValueError(
                    f"`embedding_bits_per_table`: {feature} must be one of {SUPPORTED_BITS}, got {value!r}"
                )
        for rule in self.embedding_bits_by_rows:
            if len(rule) != 2 or isinstance(rule[0], bool) or not isinstance(rule[0], int) or rule[0] < 0:
                raise ValueError(f"`embedding_bits_by_rows` entries are [min_rows, bits], got {rule}")
            if not _is_bits(rule[1]):
                raise ValueError(f"`embedding_bits_by_rows`: bits must be one of {SUPPORTED_BITS}, got {rule}")
        if self.embedding_mode not in ("symmetric", "asymmetric"):
            raise ValueError(f"`embedding_mode` must be 'symmetric' or 'asymmetric', got {self.embedding_mode!r}")
        if self.ste not in ("identity", "clipped"):
            raise ValueError(f"`ste` must be 'identity' or 'clipped', got {self.ste!r}")
        if self.embedding_granularity not in ("per_table", "per_row"):
            raise ValueError(
                f"`embedding_granularity` must be 'per_table' or 'per_row', got {self.embedding_granularity!r}"
            )
        self._check_budget()

    def _check_budget(self) -> None:
        if self.size_budget is None:
            return
        budget = self.size_budget
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise ValueError(f"`size_budget` must be a fraction in (0, 1] of the FP32 table bytes, got {budget!r}")
        if self.embedding_bits_by_rows:
            raise ValueError(
                "`size_budget` chooses the bits itself: it cannot be combined with `embedding_bits_by_rows`"
            )

    def _check_schedule(self) -> None:
        if isinstance(self.scale_period, bool) or not isinstance(self.scale_period, int) or self.scale_period <= 0:
            raise ValueError(f"`scale_period` must be a positive number of steps, got {self.scale_period}")
        if self.scale_tracking not in ("periodic", "exact"):
            raise ValueError(f"`scale_tracking` must be 'periodic' or 'exact', got {self.scale_tracking!r}")
        if self.scale_refresh not in ("incremental", "full"):
            raise ValueError(f"`scale_refresh` must be 'incremental' or 'full', got {self.scale_refresh!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {self.warmup_epochs}")

    def _check_mlp(self) -> None:
        if self.mlp_bits is not None and not _is_bits(self.mlp_bits, choices=(4, 8)):
            raise ValueError(f"`mlp_bits` must be 4, 8 or null, got {self.mlp_bits}")
        if self.mlp_granularity not in ("per_row", "per_tensor"):
            raise ValueError(f"`mlp_granularity` must be 'per_row' or 'per_tensor', got {self.mlp_granularity!r}")
        if self.mlp_activation_bits is not None and not _is_bits(self.mlp_activation_bits, choices=(4, 8, 16)):
            raise ValueError(f"`mlp_activation_bits` must be 4, 8, 16 or null, got {self.mlp_activation_bits}")
        if self.mlp_activation_bits is not None and self.mlp_bits is None:
            raise ValueError("`mlp_activation_bits` needs `mlp_bits` (activation quantization is part of MLP QAT)")
        if self.mlp_bias not in ("fp32", "reference"):
            raise ValueError(f"`mlp_bias` must be 'fp32' or 'reference', got {self.mlp_bias!r}")

    def _check_training_grid(self) -> None:
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"`rounding` must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if self.scale_learning not in ("none", "lsq"):
            raise ValueError(f"`scale_learning` must be 'none' or 'lsq', got {self.scale_learning!r}")
        lr_scale = self.lsq_lr_scale
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, int | float) or not 0 < lr_scale < float("inf"):
            raise ValueError(f"`lsq_lr_scale` must be a positive number, got {self.lsq_lr_scale!r}")
        if self.scale_learning == "lsq" and self.scale_tracking == "exact":
            raise ValueError("`scale_learning: lsq` trains the scales: set `scale_tracking: periodic` (not 'exact')")

    @property
    def quantizes_embeddings(self) -> bool:
        return self.embedding_bits is not None or bool(self.embedding_bits_per_table) or self.size_budget is not None

    @property
    def enabled(self) -> bool:
        return self.quantizes_embeddings or self.mlp_bits is not None

    def table_bits(self, feature: str, rows: int) -> int | None:
        """Bits of one table (``None`` = FP32)."""
        assert self.embedding_bits_per_table is not None  # __post_init__ stores None as {}
        return self.embedding_bits_per_table.get(feature, self._bits_by_rows(rows))

    def _bits_by_rows(self, rows: int) -> int | None:
        """Bits of a table of ``rows`` rows that no override names: ``embedding_bits_by_rows``, else the default."""
        assert self.embedding_bits_by_rows is not None  # __post_init__ stores None as []
        bits = self.embedding_bits
        for min_rows, rule_bits in sorted(self.embedding_bits_by_rows):
            if rows >= min_rows:
                bits = rule_bits
        return bits

    def table_overrides(self, tables: Mapping[str, Sequence[str]]) -> dict[str, int]:
        """``embedding_bits_per_table`` by table name, for a model whose tables are ``tables`` (table name -> the
        features looking it up). A key names a feature, or a table several features share.

        Raises:
            ValueError: a key names no feature or shared table of the model (naming the model's), or two keys give
                one table different bits.
        """
        assert self.embedding_bits_per_table is not None  # __post_init__ stores None as {}
        table_of = {feature: table for table, features in tables.items() for feature in features}
        table_of |= {table: table for table, features in tables.items() if len(features) > 1}
        overrides: dict[str, int] = {}
        for key, bits in self.embedding_bits_per_table.items():
            if key not in table_of:
                raise ValueError(f"`embedding_bits_per_table` names an unknown feature {key!r}; {_known(tables)}")
            table = table_of[key]
            if overrides.get(table, bits) != bits:
                raise ValueError(
                    f"`embedding_bits_per_table` gives table {table!r} (features {list(tables[table])}) both "
                    f"{overrides[table]} and {bits} bits; a table has one bit width"
                )
            overrides[table] = bits
        return overrides

    def assign_bits(
        self, table_rows: Mapping[str, int], dim: int, overrides: Mapping[str, int] | None = None
    ) -> dict[str, int | None]:
        """Bits of every table (``None`` = FP32), by the names of ``table_rows`` (features, or table names with
        ``overrides`` from :meth:`table_overrides`): :meth:`table_bits` of each, or under ``size_budget`` the greedy
        size policy. ``overrides`` (by the same names) default to ``embedding_bits_per_table``.

        The policy starts every table not pinned by ``embedding_bits_per_table`` at ``embedding_bits`` (8 when
        ``None``) and repeatedly lowers, to the next of {8, 4, 2}, the table whose step saves the most bytes (ties:
        the first feature), until the stored tables (:func:`stored_table_bytes`, scales and biases included) fit in
        ``size_budget`` x their FP32 bytes. The sequence of steps does not depend on the budget, so the result is
        deterministic and monotone: a smaller budget never gives a table more bits.

        Raises:
            ValueError: the budget is unreachable even with every free table at INT2 (names the smallest fraction).
        """
        assert self.embedding_bits_per_table is not None  # __post_init__ stores None as {}
        pinned = self.embedding_bits_per_table if overrides is None else overrides
        if self.size_budget is None:
            return {name: pinned.get(name, self._bits_by_rows(rows)) for name, rows in table_rows.items()}
        start = self.embedding_bits or max(BUDGET_BITS)
        bits: dict[str, int | None] = {f: pinned.get(f, start) for f in table_rows}
        free = [f for f in table_rows if f not in pinned]

        def size(feature: str, table_bits: int | None) -> int:
            return stored_table_bytes(table_rows[feature], dim, table_bits, self.embedding_granularity)

        budget = self.size_budget * sum(size(f, None) for f in table_rows)
        total = sum(size(f, b) for f, b in bits.items())
        while total > budget:
            steps = [
                (size(f, bits[f]) - size(f, _lower(bits[f])), -i, f) for i, f in enumerate(free) if _lower(bits[f])
            ]
            if not steps:
                fp32 = sum(size(f, None) for f in table_rows)
                raise ValueError(
                    f"`size_budget` {self.size_budget} is unreachable: with all tables it may lower at "
                    f"INT{min(BUDGET_BITS)} ({self.embedding_granularity}) the tables take {total / fp32:.4f} "
                    "of their FP32 bytes"
                )
            saved, _, feature = max(steps)
            bits[feature] = _lower(bits[feature])
            total -= saved
        return bits

    _STRUCTURAL = (
        "embedding_bits",
        "embedding_bits_per_table",
        "embedding_bits_by_rows",
        "embedding_mode",
        "embedding_granularity",
        "size_budget",
        "ste",
        "mlp_bits",
        "mlp_granularity",
        "mlp_bias",
        "scale_learning",
    )

    def structural_differences(self, other: QATConfig) -> list[str]:
        """Fields that change the quantized model itself (not just the training schedule) and differ."""
        return [name for name in self._STRUCTURAL if getattr(self, name) != getattr(other, name)]

    @property
    def effective_period(self) -> int:
        """Optimizer steps between two refreshes."""
        return self.scale_period + (1 if self.period_off_by_one else 0)


def stored_table_bytes(rows: int, dim: int, bits: int | None, granularity: EmbeddingGranularity) -> int:
    """Bytes a table takes in the artifact: FP32 rows (``bits`` ``None``), or codes packed per row to whole bytes plus
    an fp16 scale and bias per table (``per_table``) or per row (``per_row``)."""
    if bits is None:
        return rows * dim * 4
    codes = rows * -(-dim * bits // 8)
    return codes + 4 * (rows if granularity == "per_row" else 1)


def _lower(bits: int | None) -> int | None:
    """The next smaller candidate bit width of the size policy (``None`` below the smallest, or for FP32)."""
    smaller = [b for b in BUDGET_BITS if bits is not None and b < bits]
    return smaller[0] if smaller else None


def _known(tables: Mapping[str, Sequence[str]]) -> str:
    """The features (and shared tables) of a model, in words (Criteo: ``features are C1..C26``)."""
    features = [f for names in tables.values() for f in names]
    shown = f"{features[0]}..{features[-1]}" if len(features) > 8 else ", ".join(features)
    shared = [t for t, names in tables.items() if len(names) > 1]
    return f"features are {shown}" + (f", shared tables are {', '.join(shared)}" if shared else "")


def _is_bits(value: object, allow_none: bool = False, choices: tuple[int, ...] = SUPPORTED_BITS) -> bool:
    """Whether ``value`` is one of ``choices`` (an int: ``True`` or ``4.0`` are not bit widths)."""
    if value is None:
        return allow_none
    return isinstance(value, int) and not isinstance(value, bool) and value in choices
