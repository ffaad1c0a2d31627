"""``CriteoDataModule``: raw Criteo files (or synthetic ones), or Parquet/CSV/TSV files of a feature schema -> prepared
shards -> torchrec batches per rank."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loops.progress import _ProcessedTracker
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _BaseDataLoaderIter
from typing_extensions import override

from dqrm_lightning.data.criteo import CAT_FEATURE_COUNT, OnBadLine
from dqrm_lightning.data.dataset import CriteoIterableDataset
from dqrm_lightning.data.encoding import (
    CategoricalEncoder,
    EncodingMode,
    SchemaEncoder,
    build_schema_vocab,
    build_vocab,
    schema_vocab_dir,
    vocab_dir_for,
)
from dqrm_lightning.data.prepare import (
    SPLITS,
    FileJob,
    PrepareOptions,
    RowSource,
    cache_key,
    load_meta,
    prepare,
    raw_jobs,
    shard_file,
    shard_paths,
    split_is_labeled,
)
from dqrm_lightning.data.synthetic.bayes import BayesStats
from dqrm_lightning.data.tabular import TabularSource
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.schema import FeatureSchema, criteo_schema, load_schema
from dqrm_lightning.threads import single_threaded_worker


def _worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers are forked from a forkserver, never from the training process.

    Forking a process that runs threads (the intra-op pool, gloo's, pyarrow's, the autograd engine's) copies locks
    that those threads may hold at that instant into a child where no thread will ever release them: a worker then
    hangs (seen in 2-process runs). The forkserver is a fresh single-threaded interpreter, started once per training
    process, that has imported the dataset module; each worker is a fork of it (milliseconds). A worker's parent is
    then the forkserver, which itself lives as long as any worker does, so torch's watchdog (parent gone?) never
    fires when the rank is killed: :func:`_worker_init` ties every worker to its rank instead.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dqrm_lightning.data.dataset"])
    return context


def _worker_init(worker_id: int, rank_pid: int) -> None:
    """Loader worker start: single-threaded pools, and an exit as soon as the rank that reads from it is gone."""
    single_threaded_worker(worker_id)
    threading.Thread(target=_exit_when_gone, args=(rank_pid,), name="dqrm-rank-watch", daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    """Block (no CPU) until process ``pid`` ends, then end this process."""
    try:
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (old kernel or platform): poll once a second
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(1.0)
    select.select([handle], [], [])
    os._exit(0)


_Position = Callable[[int], tuple[int, int]]  # batches per epoch on this rank -> (epoch, first batch) to read next


class _PositionedLoader(DataLoader):
    """A DataLoader that asks its owner where the epoch starts before every new iteration."""

    def __init__(self, dataset: CriteoIterableDataset, position: _Position | None, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._position = position

    @override
    def __iter__(self) -> _BaseDataLoaderIter:
        if self._position is not None:
            dataset = self.dataset
            assert isinstance(dataset, CriteoIterableDataset)  # the one __init__ takes
            dataset.set_position(*self._position(len(dataset)))
        return super().__iter__()


class CriteoDataModule(pl.LightningDataModule):
    """Criteo Kaggle/Terabyte (or synthetic Criteo-format) data for DLRM.

    Give the raw files one way: ``train_files``/``val_files``/``test_files`` (glob patterns, plain or ``.gz``),
    ``kaggle_train_txt`` (DLRM's 7-day split of ``train.txt``), ``terabyte_dir`` (``day_0`` .. ``day_23``), or an
    already prepared directory (``prepared_dir`` alone, see ``dqrm data prepare``). Files without labels (39 fields
    per line, e.g. Kaggle's ``test.txt``) can make up a split to predict: the test split, which ``predict`` reads.

    Args:
        train_files: glob pattern(s) of training files.
        val_files: glob pattern(s) of validation files.
        test_files: glob pattern(s) of test files.
        kaggle_train_txt: path of Kaggle's ``train.txt``.
        terabyte_dir: directory holding Terabyte ``day_N`` files.
        prepared_dir: where prepared shards live (default: ``cache_dir/<key>``).
        cache_dir: parent of prepared directories (default: ``.dqrm_prepared`` beside the first raw file).
        batch_size: training rows per batch per rank.
        eval_batch_size: rows per batch for validation, test and predict.
        num_workers: dataloader worker processes per rank (0: batches are read in the training process, which
            measured fastest for DLRM on 2 cores: a worker's batch costs more to receive than to read here).
        shuffle: block-shuffle training rows each epoch (seeded).
        seed: seed of the shuffle and of negative sub-sampling.
        categorical_encoding: ``"hash"`` (modulo table size) or ``"vocab"`` (first-seen ids from a data pass).
        num_embeddings_per_feature: 26 table sizes; required for ``hash``; for ``vocab`` an optional upper bound.
        max_ind_range: modulus applied to raw categorical values first (Terabyte: 10,000,000).
        min_frequency: ``vocab`` only: values seen fewer times share id 0.
        negative_subsample: drop this fraction of negatives from the training split (Terabyte: 0.875).
        on_bad_line: ``"error"`` stops at the first malformed line, ``"skip"`` drops and counts bad lines.
        rows_per_shard: rows per prepared shard.
        evaluate_test_split: also score the test split at every validation (a second validation loader; the model
            logs it as ``fit_test/*``). This is the DQRM paper's protocol, the best test metric over all evaluations:
            model selection on the test split, to be reported as such.
        schema: a :class:`~dqrm_lightning.schema.FeatureSchema` (a mapping, or the path of a YAML file of one): the
            ``*_files`` are then Parquet (``.parquet``/``.pq``), CSV (``.csv``) or TSV (``.tsv``) files of that schema
            (:mod:`dqrm_lightning.data.tabular`), and the tables are the schema's (:meth:`resolved_schema`); the
            Criteo-only settings (``categorical_encoding``, ``num_embeddings_per_feature``, ``max_ind_range``,
            ``min_frequency``, ``kaggle_train_txt``, ``terabyte_dir``, ``on_bad_line: skip``) are then errors.
    """

    predict_split = "test"  # the split `predict` scores

    def __init__(
        self,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        test_files: list[str] | str | None = None,
        kaggle_train_txt: str | None = None,
        terabyte_dir: str | None = None,
        prepared_dir: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        categorical_encoding: EncodingMode = "hash",
        num_embeddings_per_feature: list[int] | None = None,
        max_ind_range: int | None = None,
        min_frequency: int = 1,
        negative_subsample: float = 0.0,
        on_bad_line: OnBadLine = "error",
        rows_per_shard: int = 1 << 21,
        evaluate_test_split: bool = False,
        schema: str | dict | None = None,
    ) -> None:
        super().__init__()
        # Table sizes are the model's hyper-parameter (linked from `table_sizes`); keeping them out of the data
        # module's hparams avoids a clash when Lightning merges both for the loggers.
        # the schema is the model's hyperparameter (sized, linked by the CLI): Lightning refuses a run whose model and
        # data hold one name with different values, so the data module keeps its own (maybe unsized) one aside
        self.save_hyperparameters(ignore=["num_embeddings_per_feature", "schema"])
        self.num_embeddings_per_feature = num_embeddings_per_feature
        layouts = [bool(train_files or val_files or test_files), bool(kaggle_train_txt), bool(terabyte_dir)]
        if sum(layouts) > 1:
            raise ValueError(
                "give raw data one way: `train_files`/`val_files`/`test_files`, `kaggle_train_txt` or `terabyte_dir`"
            )
        if sum(layouts) == 0 and prepared_dir is None:
            raise ValueError(
                "no data: set `train_files` (and `val_files`, `test_files`), `kaggle_train_txt`, "
                "`terabyte_dir` or `prepared_dir`"
            )
        if categorical_encoding not in ("hash", "vocab"):
            raise ValueError(f"`categorical_encoding` must be 'hash' or 'vocab', got {categorical_encoding!r}")
        self._schema = load_schema(schema) if schema is not None else None  # None: raw Criteo files
        if self._schema is not None:
            _check_schema_settings(
                self._schema, dict(self.hparams) | {"num_embeddings_per_feature": num_embeddings_per_feature}
            )
        elif categorical_encoding == "hash" and num_embeddings_per_feature is None:
            raise ValueError("`categorical_encoding: hash` needs `num_embeddings_per_feature` (26 table sizes)")
        if num_embeddings_per_feature is not None and len(num_embeddings_per_feature) != CAT_FEATURE_COUNT:
            raise ValueError(
                f"`num_embeddings_per_feature` needs {CAT_FEATURE_COUNT} sizes, got {len(num_embeddings_per_feature)}"
            )
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if max_ind_range is not None and max_ind_range <= 0:
            raise ValueError(f"`max_ind_range` must be positive or null, got {max_ind_range}")
        self.options = PrepareOptions(
            rows_per_shard=rows_per_shard, on_bad_line=on_bad_line, negative_subsample=negative_subsample, seed=seed
        )
        self._jobs: list[FileJob] | None = None
        self._prepared: Path | None = Path(prepared_dir) if prepared_dir else None
        self._table_sizes: list[int] | None = None
        self._resume: tuple[int, int] | None = None
        self._datasets: dict[str, CriteoIterableDataset] = {}

    # ----------------------------------------------------------------------------------------------- preparation
    def _source(self) -> RowSource | None:
        """How the raw files are read: ``None`` for raw Criteo files, a :class:`TabularSource` with a schema."""
        return TabularSource(self._schema) if self._schema is not None else None

    def _raw_jobs(self) -> list[FileJob]:
        if self._jobs is None:
            hp = self.hparams
            self._jobs = raw_jobs(
                hp["train_files"], hp["val_files"], hp["test_files"], hp["kaggle_train_txt"], hp["terabyte_dir"]
            )
        return self._jobs

    @property
    def prepared_dir(self) -> Path:
        """The directory of prepared shards (chosen from the inputs when not given)."""
        if self._prepared is None:
            jobs = self._raw_jobs()
            parent = Path(self.hparams["cache_dir"]) if self.hparams["cache_dir"] else default_cache_dir(jobs[0].path)
            self._prepared = parent / cache_key(jobs, self.options, self._source())
        return self._prepared

    def _has_raw(self) -> bool:
        hp = self.hparams
        return bool(
            hp["train_files"] or hp["val_files"] or hp["test_files"] or hp["kaggle_train_txt"] or hp["terabyte_dir"]
        )

    def ensure_prepared(self) -> dict:
        """Prepare the raw files once (resuming if interrupted; safe when several processes ask at once)."""
        target = self.prepared_dir
        if not self._has_raw():
            return load_meta(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f".{target.name}.lock"):
            return prepare(self._raw_jobs(), target, self.options, progress=True, source=self._source())

    @override
    def prepare_data(self) -> None:
        self.ensure_prepared()
        if self.hparams["categorical_encoding"] == "vocab" or self._schema is not None:
            self.table_sizes  # noqa: B018 - builds the vocabulary once, on one process per node

    @property
    def table_sizes(self) -> list[int]:
        """Embedding table size per feature; linked into the model's ``num_embeddings_per_feature`` (with a schema:
        rows per table, in ``schema.tables`` order)."""
        if self._table_sizes is None:
            hp = self.hparams
            if self._schema is not None:
                self._table_sizes = self.resolved_schema().table_rows()
            elif hp["categorical_encoding"] == "hash":
                assert self.num_embeddings_per_feature is not None  # __init__ requires it for hash encoding
                self._table_sizes = list(self.num_embeddings_per_feature)
            else:
                self.ensure_prepared()
                with _file_lock(self.prepared_dir / ".vocab.lock"):
                    sizes = build_vocab(self.prepared_dir, hp["max_ind_range"], hp["min_frequency"])
                bound = self.num_embeddings_per_feature
                if bound is not None:  # an upper bound only: the tables are the vocabulary's size
                    over = [f"C{i + 1}: {s} > {b}" for i, (s, b) in enumerate(zip(sizes, bound, strict=True)) if s > b]
                    if over:
                        raise ValueError(f"vocabulary exceeds `num_embeddings_per_feature` ({', '.join(over)})")
                self._table_sizes = list(sizes)
        return self._table_sizes

    @property
    def schema(self) -> FeatureSchema | None:
        """The feature schema of the files as given (tables maybe unsized), or ``None`` for raw Criteo files."""
        return self._schema

    def resolved_schema(self) -> FeatureSchema:
        """The feature schema with every table sized: raw Criteo, ``criteo_schema(table_sizes)``; with a schema, its
        ``hash`` tables as given and its ``vocab`` tables sized by the vocabulary of the prepared data (a table with
        ``rows`` keeps them, and its vocabulary must fit in them).

        Raises:
            ValueError: a vocabulary larger than its table's ``rows``.
        """
        if self._schema is None:
            return criteo_schema(self.table_sizes)
        if all(t.encoding == "hash" for t in self._schema.tables):
            return self._schema
        self.ensure_prepared()
        with _file_lock(self.prepared_dir / ".vocab.lock"):
            sizes = build_schema_vocab(self.prepared_dir, self._schema)
        bounds = {name: self._schema.table(name).rows for name in sizes}
        over = [f"{n}: {size} > {bounds[n]}" for n, size in sizes.items() if size > (bounds[n] or size)]
        if over:
            raise ValueError(f"vocabulary exceeds the `rows` of schema tables ({', '.join(over)})")
        return self._schema.with_rows({n: size for n, size in sizes.items() if bounds[n] is None})

    def encoder(self) -> CategoricalEncoder | SchemaEncoder:
        """The keys -> ids map of the prepared data: raw Criteo per feature, or per table of the schema."""
        if self._schema is not None:
            return SchemaEncoder(self.resolved_schema(), str(schema_vocab_dir(self.prepared_dir, self._schema)))
        hp = self.hparams
        vocab = vocab_dir_for(self.prepared_dir, hp["max_ind_range"], hp["min_frequency"])
        return CategoricalEncoder(hp["categorical_encoding"], self.table_sizes, hp["max_ind_range"], str(vocab))

    # ------------------------------------------------------------------------------------------------- datasets
    @override
    def setup(self, stage: str) -> None:
        meta = self.ensure_prepared()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        encoder = self.encoder()
        hp = self.hparams
        for split in SPLITS:
            shards = shard_paths(self.prepared_dir, split, meta)
            batch = hp["batch_size"] if split == "train" else hp["eval_batch_size"]
            shuffle = hp["shuffle"] and split == "train"
            self._datasets[split] = CriteoIterableDataset(
                shards, encoder, batch, shuffle, hp["seed"], rank, world, labeled=split_is_labeled(meta, split)
            )

    def _loader(self, split: str, position: _Position | None = None) -> DataLoader:
        dataset = self._datasets[split]
        if dataset.total_rows == 0:
            raise ValueError(f"the {split} split is empty: give `{split}_files` (prepared dir: {self.prepared_dir})")
        workers = self.hparams["num_workers"]
        if workers == 0:
            return _PositionedLoader(dataset, position)
        return _PositionedLoader(
            dataset,
            position,
            num_workers=workers,
            multiprocessing_context=_worker_context(),
            worker_init_fn=functools.partial(_worker_init, rank_pid=os.getpid()),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self._train_position)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.hparams["evaluate_test_split"]:
            return [self._loader("val"), self._loader("test")]
        return self._loader("val")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split)

    def split_argument(self, split: str) -> str:
        """The argument that gives a split's files, as on the command line (``data.test_files``)."""
        hp = self.hparams
        if hp["kaggle_train_txt"]:
            return "data.kaggle_train_txt"
        if hp["terabyte_dir"]:
            return "data.terabyte_dir"
        if not self._has_raw():
            return "data.prepared_dir"
        return f"data.{split}_files"

    # --------------------------------------------------------------------------------------- resume and truth
    def _train_position(self, batches: int) -> tuple[int, int]:
        """(epoch, first batch) of the next training iteration, given ``batches`` per epoch on this rank."""
        epoch = self.trainer.current_epoch if self.trainer else 0
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
            if start >= batches:
                # Saved after the epoch's last batch (end-of-epoch validation): Lightning restarts that epoch, finds
                # it finished, and trains the next epoch on this same iterator; so this iterator is the next epoch.
                epoch, start = epoch + 1, 0
        self._resume = None
        return epoch, start

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        assert isinstance(progress, _ProcessedTracker)  # what Lightning's _BatchProgress holds (typed as its base)
        return {"epoch": self.trainer.current_epoch, "train_batches": progress.processed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["train_batches"]))

    def truth_metrics(self) -> dict[str, dict[str, float]]:
        """Bayes-optimal AUC and log loss per split when the data carries true probabilities (synthetic data).

        Computed as for ``truth.json`` (:class:`BayesStats`), over the rows of the prepared split; a split without
        both clicks and non-clicks has no AUC and is left out.
        """
        meta = self.ensure_prepared()
        if not meta.get("has_prob"):
            return {}
        result = {}
        for split in ("val", "test"):
            shards = shard_paths(self.prepared_dir, split, meta)
            if not shards or not split_is_labeled(meta, split):
                continue
            stats = BayesStats()
            for prefix, _ in shards:
                stats.update_probabilities(np.load(shard_file(prefix, "labels")), np.load(shard_file(prefix, "prob")))
            bayes = stats.result()
            if bayes["bayes_auc"] is not None:
                result[split] = {"auc": bayes["bayes_auc"], "log_loss": bayes["bayes_log_loss"]}
        return result

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description for run summaries."""
        meta = self.ensure_prepared()
        return {
            "prepared_dir": str(self.prepared_dir),
            "rows": {s: meta["splits"][s]["rows"] for s in SPLITS},
            "labeled": {s: split_is_labeled(meta, s) for s in SPLITS},
            "skipped_lines": meta.get("skipped_lines", 0),
            "table_sizes": self.table_sizes,
        }


_CRITEO_ONLY = {
    "categorical_encoding": "hash",
    "num_embeddings_per_feature": None,
    "max_ind_range": None,
    "min_frequency": 1,
    "kaggle_train_txt": None,
    "terabyte_dir": None,
    "on_bad_line": "error",
}


def _check_schema_settings(schema: FeatureSchema, settings: dict[str, Any]) -> None:
    """With a schema: no Criteo-only setting away from its default, and every ``hash`` table has its rows.

    Raises:
        ConfigError: naming the setting or the table.
    """
    for name, default in _CRITEO_ONLY.items():
        if settings.get(name) != default:
            raise ConfigError(
                f"`data.{name}` is for raw Criteo files; with `data.schema` the schema's tables say it "
                f"(got {settings[name]!r})"
            )
    unsized = [t.name for t in schema.tables if t.encoding == "hash" and t.rows is None]
    if unsized:
        raise ConfigError(f"`data.schema` tables {unsized} use `encoding: hash` and need `rows` (the modulus)")


def default_cache_dir(first_file: str) -> Path:
    """``.dqrm_prepared`` beside the data when that folder is writable, else ``~/.cache/dqrm_lightning/prepared``."""
    beside = Path(first_file).resolve().parent
    if os.access(beside, os.W_OK):
        return beside / ".dqrm_prepared"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dqrm_lightning" / "prepared"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
