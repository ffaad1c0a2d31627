"""``FeatureSchema``: what a data set's rows hold and which embedding tables its sparse features look up.

A schema names the label column, the dense (float) columns and the sparse (categorical) features; each sparse feature
is one-hot (one id per row) or multi-hot (a list column, or a string column split on a delimiter: histories, tags) and
looks up one table; several features may share a table (one id space, one set of rows: e.g. a "movie" feature and a
"watched movies" history). Each table has its rows (``null``: sized from the data's vocabulary), an embedding
dimension (``null``: the model's ``embedding_dim``), a pooling (``sum`` or ``mean`` over a bag) and an encoding of raw
values into ids (``hash``: modulo the rows; ``vocab``: first-seen ids, values seen fewer than ``min_frequency`` times
share id 0).

In a config (``data.schema``, inline or the path of a YAML file holding the same mapping)::

    data:
      schema:
        label: clicked
        dense: [{name: age}, {name: price, transform: log1p}]
        sparse:
          - {name: user, column: user_id}
          - {name: movie, column: movie_id, table: movies}
          - {name: history, column: watched, table: movies, multi_hot: true}
          - {name: genres, multi_hot: true, delimiter: "|"}
        tables:
          - {name: movies, encoding: vocab, min_frequency: 2}
          - {name: t_user, rows: 100000, dim: 8}

A sparse feature without ``table`` has a table of its own, named :func:`~dqrm_lightning.names.table_name` of the
feature (``t_<feature>``); ``tables`` lists only the tables whose settings differ from the defaults (a table listed
there but used by no feature is an error). Criteo Kaggle and Terabyte are the preset :func:`criteo_schema`: 13 dense
columns ``I1..I13`` (missing values 0, ``log(x + 1)``), 26 one-hot features ``C1..C26``, each its own table
``t_C1..t_C26``.

Order matters and is kept: a batch's sparse features (KeyedJaggedTensor keys) are ``sparse`` in the order given, the
tables the order in which features first use them, and the model's pooled embeddings (interaction, embedding QAT)
the features of each table in table order (:attr:`FeatureSchema.pooled_feature_names`, TorchRec's ``SparseArch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from dqrm_lightning.errors import ConfigError
from dqrm_lightning.names import table_name

__all__ = [
    "DenseFeature",
    "FeatureSchema",
    "SparseFeature",
    "TableSpec",
    "criteo_schema",
    "load_schema",
    "schema_of",
]

Transform = Literal["none", "log1p"]
Pooling = Literal["sum", "mean"]
Encoding = Literal["hash", "vocab"]
_TRANSFORMS = ("none", "log1p")
_POOLINGS = ("sum", "mean")
_ENCODINGS = ("hash", "vocab")


@dataclass(frozen=True)
class DenseFeature:
    """A float column.

    Args:
        name: the feature's name.
        column: the input column (default: ``name``).
        transform: ``none`` or ``log1p`` (``log(x + 1)``, Criteo's; negative values are then an error).
        missing: the value of a missing entry, or ``None``: a missing entry is an error (never filled silently).
    """

    name: str
    column: str | None = None
    transform: Transform = "none"
    missing: float | None = None

    @property
    def source(self) -> str:
        return self.column or self.name


@dataclass(frozen=True)
class SparseFeature:
    """A categorical feature looked up in one embedding table.

    Args:
        name: the feature's name (a KeyedJaggedTensor key).
        column: the input column (default: ``name``).
        table: the table it looks up (default: a table of its own, ``t_<name>``).
        multi_hot: several ids per row (a list column, or a string column split on ``delimiter``); an empty list is
            an empty bag (a pooled vector of zeros). One-hot features need exactly one value per row.
        delimiter: split a string column on this (multi-hot only); ``None``: the column is a list column.
    """

    name: str
    column: str | None = None
    table: str | None = None
    multi_hot: bool = False
    delimiter: str | None = None

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def table_name(self) -> str:
        return self.table or table_name(self.name)


@dataclass(frozen=True)
class TableSpec:
    """An embedding table.

    Args:
        name: the table's name (its TorchRec ``EmbeddingBagConfig`` name and state-dict key).
        rows: rows (``hash``: required, the modulus; ``vocab``: ``None`` sizes it from the data, a number is an upper
            bound the vocabulary must fit in).
        dim: embedding dimension (``None``: the model's ``embedding_dim``).
        pooling: ``sum`` or ``mean`` over a bag.
        encoding: ``hash`` or ``vocab`` (over the values of every feature using the table).
        min_frequency: ``vocab`` only: values seen fewer times share id 0.
    """

    name: str
    rows: int | None = None
    dim: int | None = None
    pooling: Pooling = "sum"
    encoding: Encoding = "hash"
    min_frequency: int = 1


@dataclass(frozen=True)
class FeatureSchema:
    """The label, dense columns, sparse features and tables of a data set (see the module docstring).

    ``tables`` holds every table the features use, in first-use order, once :meth:`from_dict` (or the constructor
    through ``__post_init__``) has filled in the defaults.
    """

    dense: tuple[DenseFeature, ...]
    sparse: tuple[SparseFeature, ...]
    tables: tuple[TableSpec, ...] = ()
    label: str | None = "label"
    name: str = "custom"

    def __post_init__(self) -> None:
        _check_names("dense", [d.name for d in self.dense])
        _check_names("sparse", [s.name for s in self.sparse])
        if not self.sparse:
            raise ConfigError("`schema.sparse` needs at least one sparse feature")
        for s in self.sparse:
            if s.delimiter is not None and not s.multi_hot:
                raise ConfigError(f"`schema.sparse` {s.name!r}: `delimiter` is for multi-hot features only")
        for d in self.dense:
            if d.transform not in _TRANSFORMS:
                raise ConfigError(f"`schema.dense` {d.name!r}: `transform` must be one of {_TRANSFORMS}")
        given = {t.name: t for t in self.tables}
        _check_names("tables", [t.name for t in self.tables])
        used = list(dict.fromkeys(s.table_name for s in self.sparse))
        unused = sorted(set(given) - set(used))
        if unused:
            raise ConfigError(f"`schema.tables` lists tables no sparse feature uses: {unused}")
        tables = tuple(given.get(name, TableSpec(name)) for name in used)
        for t in tables:
            _check_table(t)
        object.__setattr__(self, "tables", tables)

    # ------------------------------------------------------------------------------------------------- lookups
    @property
    def dense_names(self) -> list[str]:
        return [d.name for d in self.dense]

    @property
    def feature_names(self) -> list[str]:
        """The sparse features, in order (the KeyedJaggedTensor keys)."""
        return [s.name for s in self.sparse]

    @property
    def pooled_feature_names(self) -> list[str]:
        """The sparse features in the order of the model's pooled embeddings (TorchRec's ``SparseArch``: the features
        of each table, tables in order), which the interaction, the top MLP's input and the embedding quantizer
        follow; :attr:`feature_names` unless features sharing a table are apart in ``sparse``."""
        return [feature for table in self.table_names for feature in self.features_of(table)]

    @property
    def table_names(self) -> list[str]:
        return [t.name for t in self.tables]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"no table {name!r} in the schema; tables are {self.table_names}")

    def table_of(self, feature: str) -> TableSpec:
        """The table a sparse feature looks up."""
        for s in self.sparse:
            if s.name == feature:
                return self.table(s.table_name)
        raise KeyError(f"no sparse feature {feature!r} in the schema; features are {self.feature_names}")

    def features_of(self, table: str) -> list[str]:
        """The sparse features looking up ``table``, in order."""
        return [s.name for s in self.sparse if s.table_name == table]

    def dim_of(self, table: str, default: int) -> int:
        dim = self.table(table).dim
        return default if dim is None else dim

    @property
    def multi_hot(self) -> bool:
        """Whether any feature is multi-hot."""
        return any(s.multi_hot for s in self.sparse)

    @property
    def shared_tables(self) -> bool:
        """Whether any table is looked up by more than one feature."""
        return len(self.tables) < len(self.sparse)

    @property
    def sized(self) -> bool:
        """Whether every table's rows are known."""
        return all(t.rows is not None for t in self.tables)

    def table_rows(self) -> list[int]:
        """Rows of each table, in table order.

        Raises:
            ConfigError: a table is not sized yet (vocab encoding before the data was read).
        """
        missing = [t.name for t in self.tables if t.rows is None]
        if missing:
            raise ConfigError(f"tables {missing} have no `rows`: give them, or use vocab encoding to size them")
        return [int(t.rows) for t in self.tables if t.rows is not None]

    def with_rows(self, rows: Mapping[str, int]) -> FeatureSchema:
        """This schema with the rows of the tables named in ``rows`` set (e.g. from a vocabulary)."""
        unknown = sorted(set(rows) - set(self.table_names))
        if unknown:
            raise KeyError(f"no tables {unknown} in the schema; tables are {self.table_names}")
        tables = tuple(dataclasses.replace(t, rows=int(rows[t.name])) if t.name in rows else t for t in self.tables)
        return dataclasses.replace(self, tables=tables)

    # ----------------------------------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (YAML/JSON, checkpoints) that :meth:`from_dict` reads back to an equal schema."""
        return dataclasses.asdict(self) | {
            "dense": [dataclasses.asdict(d) for d in self.dense],
            "sparse": [dataclasses.asdict(s) for s in self.sparse],
            "tables": [dataclasses.asdict(t) for t in self.tables],
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> FeatureSchema:
        """Read a schema mapping, with one clear error naming the first bad entry.

        Raises:
            ConfigError: unknown keys, missing names, bad values.
        """
        if not isinstance(value, Mapping):
            raise ConfigError(f"`schema` must be a mapping (or a YAML file of one), got {type(value).__name__}")
        _check_keys("schema", value, {f.name for f in dataclasses.fields(cls)})
        parts: dict[str, Any] = {
            key: tuple(_entry(kind, key, i, entry) for i, entry in enumerate(value.get(key) or []))
            for key, kind in (("dense", DenseFeature), ("sparse", SparseFeature), ("tables", TableSpec))
        }
        parts |= {k: value[k] for k in ("label", "name") if k in value}
        return cls(**parts)


def _entry(kind: type, key: str, index: int, entry: Any) -> Any:
    """One ``dense``/``sparse``/``tables`` entry: a mapping, or a bare name."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"`schema.{key}[{index}]` must be a mapping or a name, got {entry!r}")
    _check_keys(f"schema.{key}[{index}]", entry, {f.name for f in dataclasses.fields(kind)})
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ConfigError(f"`schema.{key}[{index}]` needs a `name`")
    return kind(**entry)


def _check_keys(where: str, value: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"`{where}` has unknown keys {unknown}; known keys are {sorted(known)}")


def _check_names(key: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"`schema.{key}` names {name!r} twice")
        seen.add(name)


def _check_table(t: TableSpec) -> None:
    where = f"`schema.tables` {t.name!r}"
    if t.rows is not None and (isinstance(t.rows, bool) or not isinstance(t.rows, int) or t.rows < 1):
        raise ConfigError(f"{where}: `rows` must be a positive integer or null, got {t.rows!r}")
    if t.dim is not None and (isinstance(t.dim, bool) or not isinstance(t.dim, int) or t.dim < 1):
        raise ConfigError(f"{where}: `dim` must be a positive integer or null, got {t.dim!r}")
    if t.pooling not in _POOLINGS:
        raise ConfigError(f"{where}: `pooling` must be one of {_POOLINGS}, got {t.pooling!r}")
    if t.encoding not in _ENCODINGS:
        raise ConfigError(f"{where}: `encoding` must be one of {_ENCODINGS}, got {t.encoding!r}")
    if isinstance(t.min_frequency, bool) or not isinstance(t.min_frequency, int) or t.min_frequency < 1:
        raise ConfigError(f"{where}: `min_frequency` must be an integer >= 1, got {t.min_frequency!r}")
    if t.min_frequency > 1 and t.encoding != "vocab":
        raise ConfigError(f"{where}: `min_frequency` needs `encoding: vocab`")


def load_schema(value: FeatureSchema | Mapping[str, Any] | str | Path) -> FeatureSchema:
    """A schema from itself, a mapping, or the path of a YAML file holding the mapping (at its top level or under
    ``data.schema``, so that a config file stacked with ``-c`` can be read alone too).

    Raises:
        ConfigError: the file is missing or the schema is bad (naming the file).
    """
    if isinstance(value, FeatureSchema):
        return value
    if isinstance(value, Mapping):
        return FeatureSchema.from_dict(value)
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"schema file {path} does not exist")
    loaded = yaml.safe_load(path.read_text())
    if isinstance(loaded, Mapping) and isinstance(loaded.get("data"), Mapping) and "schema" in loaded["data"]:
        loaded = loaded["data"]["schema"]
    try:
        return FeatureSchema.from_dict(loaded)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def criteo_schema(
    table_rows: Sequence[int | None] | None = None, encoding: Encoding = "hash", min_frequency: int = 1
) -> FeatureSchema:
    """Criteo Kaggle/Terabyte: label, 13 dense ``I1..I13`` (missing = 0, ``log(x + 1)``), 26 one-hot ``C1..C26``,
    each in its own table ``t_C1..t_C26`` (rows: ``table_rows``, or unsized)."""
    from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES

    rows = list(table_rows) if table_rows is not None else [None] * len(DEFAULT_CAT_NAMES)
    if len(rows) != len(DEFAULT_CAT_NAMES):
        raise ConfigError(f"`num_embeddings_per_feature` needs {len(DEFAULT_CAT_NAMES)} sizes, got {len(rows)}")
    return FeatureSchema(
        name="criteo",
        label="label",
        dense=tuple(DenseFeature(name, transform="log1p", missing=0.0) for name in DEFAULT_INT_NAMES),
        sparse=tuple(SparseFeature(name) for name in DEFAULT_CAT_NAMES),
        tables=tuple(
            TableSpec(table_name(name), rows=n, encoding=encoding, min_frequency=min_frequency)
            for name, n in zip(DEFAULT_CAT_NAMES, rows, strict=True)
        ),
    )


def schema_of(hparams: Mapping[str, Any]) -> FeatureSchema:
    """The feature schema of a model's hyperparameters (a DLRMModule's, or a checkpoint's ``hyper_parameters``):
    ``schema`` (a mapping, with every table sized) when given, else the Criteo preset of
    ``num_embeddings_per_feature`` (checkpoints from before schemas hold only that)."""
    if hparams.get("schema"):
        return load_schema(hparams["schema"])
    return criteo_schema(hparams["num_embeddings_per_feature"])
