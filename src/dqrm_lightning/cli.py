"""The ``dqrm`` command: LightningCLI (fit/validate/test/predict) plus ``dqrm data synth|movielens|prepare``.

Every run writes ``summary.json`` in its log directory and prints ``summary: <path>`` as its last line; ``predict``
prints ``predictions: <path> (<rows> rows)`` just before it.

Settings are checked when the classes are built, before any data is read or process started; a bad one stops the run
with one line naming the argument (``dqrm fit: error: `qat.scale_period` must be ...``). Checkpoints load with
``weights_only=True`` only (:mod:`dqrm_lightning.checkpoint`): a file whose loading would run code is refused.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import importlib
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import Strategy

from dqrm_lightning._lightning import connected
from dqrm_lightning.callbacks import CommunicationAccounting, QuantizationAwareTraining, RunSummary, StepTimer
from dqrm_lightning.callbacks.interrupt import ContinuedMetrics, RunInterrupted, StopOnSignal
from dqrm_lightning.callbacks.predictions import PredictionWriter
from dqrm_lightning.callbacks.progress import LineProgress, TerminalProgress, stdout_is_terminal
from dqrm_lightning.callbacks.threads import ThreadPolicy
from dqrm_lightning.checkpoint import CheckpointError, SafeCheckpointIO, load_error
from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.data.dataset import rank_slices
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.export.inference import MLP_PRECISIONS
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.runs import find_checkpoint, read_metrics, remove_if_unused, run_version, wandb_run_id
from dqrm_lightning.schema import criteo_schema, load_schema
from dqrm_lightning.strategies import (  # registers --trainer.strategy torchrec
    TorchRecStrategyBase,
)
from dqrm_lightning.strategies.peers import die_with_torchrun_agent
from dqrm_lightning.threads import apply as apply_threads
from dqrm_lightning.threads import local_processes_from_env, remember_user_environment, resolve

_LINKED = "model.num_embeddings_per_feature"
_LINKED_SCHEMA = "model.schema"
_WITHOUT_VALIDATION = " (or `--trainer.limit_val_batches 0` to train without validation)"
_RAW_INPUTS = ("train_files", "val_files", "test_files", "kaggle_train_txt", "terabyte_dir")

_WANDB_MODES = ("auto", "online", "offline", "disabled")
# The subcommands beside LightningCLI's: the module whose ``main(argv)`` runs one, and the label of the path it returns
_TOOLS = {
    "data": ("dqrm_lightning.commands.data", "summary"),
    "export": ("dqrm_lightning.commands.export", "summary"),
    "compare": ("dqrm_lightning.commands.compare", "summary"),
    "reproduce": ("dqrm_lightning.reproduce", "summary"),
    "dashboard": ("dqrm_lightning.dashboard", "workspace"),
}
_MORE_COMMANDS = (
    "more subcommands: `dqrm data synth|movielens|prepare` (synthetic or MovieLens data in the Criteo format, or "
    "as Parquet of a feature schema; raw files -> prepared shards), "
    "`dqrm export` (checkpoint -> packed INT-N artifact), `dqrm compare` (models' predictions over seeds, with "
    "confidence intervals), `dqrm reproduce` (the paper's tables), `dqrm dashboard` (the wandb workspace); each "
    "takes --help"
)


def wandb_mode(requested: str) -> str:
    """``auto``: online when credentials exist (WANDB_API_KEY or a netrc entry), else offline (no network)."""
    if requested not in _WANDB_MODES:
        raise ValueError(f"`wandb` must be one of {_WANDB_MODES}, got {requested!r}")
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_netrc = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or has_netrc else "offline"


class DQRMCLI(LightningCLI):
    """LightningCLI for DLRM/DQRM with table sizes linked from the data and a run summary."""

    last: DQRMCLI | None = None  # the CLI being run: `main` reads its launcher's ranks when the run fails

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        DQRMCLI.last = self
        self._checkpoint: str | None = None  # --ckpt_path, `best`/`last` resolved
        self._new_log_dir: Path | None = None  # the log directory this run created
        self._argv: list[str] = []
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # exit_on_error False: a bad option raises, and `main` reports it in one line (not ~90 lines of usage)
        kwargs.setdefault("parser_kwargs", {"default_env": False, "epilog": _MORE_COMMANDS, "exit_on_error": False})
        super().__init__(DLRMModule, CriteoDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data", "model.num_embeddings_per_feature", compute_fn=_table_sizes, apply_on="instantiate"
        )
        parser.link_arguments("data", "model.schema", compute_fn=_schema, apply_on="instantiate")
        parser.add_lightning_class_args(StepTimer, "step_timer")
        # QATConfig's fields are the flat --qat.* options; instantiate_trainer hands the config to the callback
        parser.add_class_arguments(QATConfig, "qat", sub_configs=True)
        parser.add_argument("--wandb", default="auto", choices=_WANDB_MODES, help="wandb logging mode")
        parser.add_argument("--wandb_project", default="dqrm-lightning", help="wandb project")
        parser.add_argument(
            "--predictions", default="predictions.tsv", help="predict: file (in the log dir) for probabilities"
        )
        parser.add_argument("--artifact", default=None, help="validate/test/predict with an exported artifact")
        parser.add_argument("--engine", default="torchrec", choices=("torchrec", "plain"), help="artifact engine")
        parser.add_argument(
            "--mlp_precision",
            default="fp32",
            choices=MLP_PRECISIONS,
            help="artifact MLP products: fp32 (the QAT model's predictions) or bf16 (faster on CPUs with AVX512-BF16 "
            "or AMX; predictions change slightly)",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=0,
            help="fit: also refresh last.ckpt every N training steps (0: at validations only); resume a killed run "
            "with --ckpt_path last",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="intra-op threads per rank (default: sized to this rank's share of the CPUs; OMP_NUM_THREADS wins)",
        )
        parser.add_argument(
            "--progress_every_n_steps",
            type=int,
            default=0,
            help="when output is not a terminal: a progress line every N training steps (0: one per epoch)",
        )

    def _setting(self, key: str, default: Any = None, built: bool = False) -> Any:
        """A value of this subcommand's configuration (``built``: as instantiated, e.g. callback objects)."""
        config = self.config_init if built else self.config
        section = config.get(self.subcommand) if self.subcommand else config
        return section.get(key, default)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._setting("trainer", {}, built=True)
        root = config.get("default_root_dir") or "runs"
        self._checkpoint = self._resolve_checkpoint(root)
        callbacks: list[Any] = [
            RunSummary(),
            CommunicationAccounting(),
            ThreadPolicy(self._setting("threads")),
        ]
        if config.get("logger") in (None, True):
            version = run_version(self._checkpoint, root) if self.subcommand == "fit" else None
            kwargs["logger"], previous_metrics = self._default_loggers(root, version)
            if previous_metrics:
                callbacks.append(ContinuedMetrics(previous_metrics))
        if config.get("enable_progress_bar") is not False:
            every = self._setting("progress_every_n_steps")
            callbacks.append(TerminalProgress() if stdout_is_terminal() else LineProgress(every))
        if self.subcommand == "fit":
            callbacks.append(StopOnSignal())
        if self.subcommand == "fit" and config.get("enable_checkpointing") is not False:
            callbacks.append(ModelCheckpoint(monitor="val/auc", mode="max", filename="best", save_last=True))
            every = self._setting("checkpoint_every_n_steps")
            if every < 0:
                raise ConfigError(f"`checkpoint_every_n_steps` must be >= 0, got {every}")
            if every:
                callbacks.append(ModelCheckpoint(every_n_train_steps=every, save_top_k=0, save_last=True))
        if self.subcommand == "predict":
            callbacks.append(PredictionWriter(self._setting("predictions")))
        given = config.get("callbacks")
        given = [] if given is None else list(given) if isinstance(given, list) else [given]
        kwargs["callbacks"] = [*given, QuantizationAwareTraining(self._setting("qat", built=True)), *callbacks]
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(SafeCheckpointIO())  # single files: loaded weights-only, written atomically
        # LightningCLI adds the --step_timer callback and the config-saving callback
        return super().instantiate_trainer(default_root_dir=root, plugins=plugins, **kwargs)

    def _resolve_checkpoint(self, root: str) -> str | None:
        """``--ckpt_path``, with ``best``/``last`` resolved to the newest such file under ``root``."""
        which = self._setting("ckpt_path")
        if which not in ("best", "last"):
            return which
        try:
            return find_checkpoint(root, which)
        except FileNotFoundError as err:
            if self.subcommand != "fit":
                raise ConfigError(str(err)) from None
            # a restart loop (`dqrm fit ... --ckpt_path last`) whose first run died before any checkpoint
            print(f"no {which}.ckpt under {root}: training from scratch", file=sys.stderr)
            return None

    def _default_loggers(self, root: str, version: int | None) -> tuple[list[Logger], list[dict[str, str]]]:
        """CSV (and wandb) loggers; ``version``: continue that run (its directory, metrics and wandb run).

        Returns the loggers and the metrics rows the continued run had logged (Lightning's CSV logger starts
        ``metrics.csv`` afresh; :class:`ContinuedMetrics` logs them again)."""
        csv_logger = CSVLogger(save_dir=root, name="lightning_logs", version=version)
        previous: list[dict[str, str]] = []
        wandb_id = None
        if version is not None:
            run_dir = Path(csv_logger.log_dir)
            previous = read_metrics(run_dir / "metrics.csv")
            wandb_id = wandb_run_id(run_dir)
            for message in ("Experiment logs directory", "Checkpoint directory"):  # expected: continuing in place
                warnings.filterwarnings("ignore", message=f".*{message} .* exists and is not empty.*")
        else:
            self._new_log_dir = Path(csv_logger.log_dir)  # removed again if the run fails before writing anything
        loggers: list[Logger] = [csv_logger]
        mode = wandb_mode(self._setting("wandb"))
        if mode != "disabled":
            number = csv_logger.version
            csv_logger.experiment  # noqa: B018 - the CSV log directory first: wandb's files then land in it
            wandb_logger = WandbLogger(
                project=self._setting("wandb_project"),
                save_dir=os.path.join(root, "lightning_logs", f"version_{number}"),
                offline=mode == "offline",
                name=f"{self.subcommand}-v{number}",
                id=wandb_id,
            )
            # Lightning passes `anonymous=None`, which wandb (>= 0.19) warns about on every run: leave it unset
            wandb_logger._wandb_init.pop("anonymous", None)
            loggers.append(wandb_logger)
            os.environ.setdefault("WANDB_SILENT", "true")
        return loggers, previous

    def _summary_callback(self) -> RunSummary:
        return next(c for c in connected(self.trainer).callbacks if isinstance(c, RunSummary))

    def _check_splits(self, data: dict[str, Any]) -> None:
        """Each split the subcommand reads holds rows, and labels unless it is predicted (else one line naming the
        argument, before any run starts)."""
        assert self.subcommand is not None  # set while a subcommand runs
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[self.subcommand]
        if self.subcommand == "fit" and self.trainer.limit_val_batches == 0:
            needed = ["train"]
        elif self.subcommand in ("fit", "validate") and self.datamodule.hparams.get("evaluate_test_split"):
            needed.append("test")  # scored at every validation
        for split in needed:
            if data["rows"][split] == 0:
                hint = _WITHOUT_VALIDATION if split == "val" else ""
                raise ConfigError(f"the {split} split is empty: give `--data.{split}_files`{hint}")
        if self.subcommand == "predict":
            return  # scoring needs no labels
        for split in needed:
            if data.get("labeled", {}).get(split, True):
                continue
            if self.subcommand == "fit":
                need = "training" if split == "train" else "validation"
                hint = _WITHOUT_VALIDATION if split == "val" else ""
                advice = f"{need} needs labeled (40-field) lines{hint}"
            else:
                advice = "score it with `dqrm predict`" + (" (as `--data.test_files`)" if split != "test" else "")
            argument = self.datamodule.split_argument(split)
            raise ConfigError(f"the {split} split (`--{argument}`) has no labels (39-field lines): {advice}")

    def _fit_intervals(self, train_rows: int) -> None:
        """Step intervals longer than an epoch (a Kaggle-size config on a small file): ``val_check_interval`` validates
        at each epoch end instead of stopping the run (Lightning refuses it), ``log_every_n_steps`` logs the last step
        of each epoch instead of never logging training metrics (Lightning warns)."""
        trainer = self.trainer
        if self.subcommand != "fit":
            return
        batches = len(rank_slices(train_rows, self.datamodule.hparams["batch_size"], trainer.world_size, 0))
        if isinstance(trainer.limit_train_batches, int):
            batches = min(batches, trainer.limit_train_batches)
        notes = []
        interval = trainer.val_check_interval
        if isinstance(interval, int) and trainer.check_val_every_n_epoch is not None and interval > batches:
            notes.append(f"`trainer.val_check_interval` {interval}: validating at each epoch end")
            trainer.val_check_interval = 1.0
        every = connected(trainer).log_every_n_steps
        if 0 < batches < every:
            notes.append(f"`trainer.log_every_n_steps` {every}: logging every {batches} steps")
            connected(trainer).log_every_n_steps = batches
        if notes and trainer.is_global_zero:
            print(f"an epoch has {batches} training batches: {'; '.join(notes)}", file=sys.stderr)

    def _before(self) -> None:
        try:  # prepares the data unless building the classes did (vocabulary encoding)
            data = self.datamodule.describe()
        except (ValueError, FileNotFoundError, IsADirectoryError) as err:  # bad input data: named, in one line
            raise ConfigError(_data_error(err)) from err
        self._check_splits(data)
        self._fit_intervals(data["rows"]["train"])
        artifact = self._setting("artifact")
        if artifact:
            if self.subcommand == "fit":
                raise ValueError("`--artifact` is for validate, test and predict; fit trains a model")
            if self._setting("ckpt_path"):
                raise ValueError("give either `--artifact` or `--ckpt_path`, not both")
            self.model.use_artifact(artifact, self._setting("engine"), self._setting("mlp_precision"))
        self._checkpoint_arguments()
        summary = self._summary_callback()
        dumped = json.loads(self.parser.dump(self.config, format="json", skip_check=True))
        summary.config = dumped.get(self.subcommand, dumped)
        for logger in self.trainer.loggers:  # the full resolved configuration on the wandb run page
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": summary.config})

    before_fit = before_validate = before_test = before_predict = _before

    def _after(self) -> None:
        summary = self._summary_callback()
        if not self.trainer.is_global_zero:
            return
        for callback in connected(self.trainer).callbacks:
            if isinstance(callback, PredictionWriter) and callback.path is not None:
                print(f"predictions: {callback.describe()}", flush=True)
        if summary.path is not None:
            print(f"summary: {summary.path}", flush=True)

    after_fit = after_validate = after_test = after_predict = _after

    def _checkpoint_arguments(self) -> None:
        """The trainer method gets the resolved ``ckpt_path`` and loads it weights-only (LightningCLI passes the
        subcommand's configured arguments to it)."""
        assert self.subcommand is not None  # set while a subcommand runs
        arguments = self.config_init[self.subcommand]
        if arguments.get("weights_only") is False:
            raise ConfigError("`weights_only: false` is not supported: checkpoints load without unpickling objects")
        if "ckpt_path" in arguments:
            arguments["ckpt_path"] = self._checkpoint
            self.config[self.subcommand]["ckpt_path"] = self._checkpoint  # the summary names the file it loaded
        if "weights_only" in inspect.signature(getattr(self.trainer, self.subcommand)).parameters:
            arguments["weights_only"] = True
        if self.subcommand != "fit":
            # validate/test/predict restore the model only: the training callbacks whose state the checkpoint holds
            # (ModelCheckpoint, ...) are not needed, though Lightning warns that they are missing
            warnings.filterwarnings("ignore", message=".*when using `ckpt_path`, callbacks used to create")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        given = sys.argv[1:] if args is None else args
        if isinstance(given, list | tuple) and any(str(a).startswith(f"--{_LINKED_SCHEMA}") for a in given):
            raise ConfigError(f"`{_LINKED_SCHEMA}` is set from the data: give the feature schema as `--data.schema`")
        if isinstance(given, list | tuple) and any(str(a).startswith(f"--{_LINKED}") for a in given):
            raise ConfigError(
                f"`{_LINKED}` is set from the data (`data.table_sizes`): give table sizes with "
                "`--data.num_embeddings_per_feature` (hash encoding) or let the vocabulary size them (vocab encoding)"
            )
        self._argv = [str(a) for a in given] if isinstance(given, list | tuple) else []
        super().parse_arguments(parser, args)
        self._prepared_dir_replaces_raw_inputs()
        self._check_checkpoint_file()

    def _check_checkpoint_file(self) -> None:
        """A missing, refused or unreadable ``--ckpt_path`` file is one line: LightningCLI reads the file's
        hyper-parameters right after parsing, and a garbage file fails inside ``torch.load`` with almost any error."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in ("best", "last", "hpc", "registry"):
            return
        if not Path(path).exists():
            raise ConfigError(f"`--ckpt_path {path}`: no such file or directory")
        if Path(path).is_file():
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise load_error(path, err) from None

    def _prepared_dir_replaces_raw_inputs(self) -> None:
        """``--data.prepared_dir`` on the command line reads that prepared data with any base config: the raw inputs
        set by config files (configs/demo.yaml's file globs) are dropped, unless the command line names raw inputs
        too (then they are prepared into that directory, as in a config file)."""
        given = {a.split("=", 1)[0] for a in self._argv if a.startswith("--data.")}
        if "--data.prepared_dir" not in given or given & {f"--data.{key}" for key in _RAW_INPUTS}:
            return
        subcommand = self.config.get("subcommand")
        data = (self.config.get(subcommand) if subcommand else self.config).get("data")
        if data is not None:
            for key in _RAW_INPUTS:
                data[key] = None

    def instantiate_classes(self) -> None:
        self._check_before_building()
        try:  # before the data module prepares the data (pyarrow); refined per rank by ThreadPolicy in `setup`
            apply_threads(resolve(self._setting("threads"), local_processes_from_env()))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as err:  # the classes' own checks and the data's: named, in one line
            inner = _unlinked(err)
            if isinstance(inner, OSError) and not isinstance(inner, FileNotFoundError | IsADirectoryError):
                raise
            raise ConfigError(_data_error(inner)) from err

    def _check_before_building(self) -> None:
        """Every group's settings, checked by its own class before jsonargparse builds them all: an error then names
        its argument as on the command line (`qat.scale_period`), and comes before the data is prepared (building
        the classes links the table sizes from the data: hours on the full Criteo data). What fails while building
        after these checks is the data itself."""
        for prefix, cls, check in (
            ("model", DLRMModule, DLRMModule.check_arguments),
            ("qat", QATConfig, self._check_qat),
            ("step_timer", StepTimer, lambda values: StepTimer(**values)),
            ("data", CriteoDataModule, lambda values: CriteoDataModule(**values)),  # cheap: reads nothing yet
        ):
            config = self._setting(prefix)
            if config is None:
                continue
            values = config.as_dict() if hasattr(config, "as_dict") else dict(config)
            try:
                check(values)
            except ValueError as err:
                raise ConfigError(_qualify(str(err), prefix, set(inspect.signature(cls).parameters))) from err
        self._check_strategy()

    def _check_qat(self, values: dict[str, Any]) -> None:
        """The QAT settings, and their per-table bits against the model's features (the model's or the data's
        schema by name, else Criteo's; a schema that does not load is reported by its own group's check)."""
        config = QATConfig(**values)
        schema = criteo_schema()
        for prefix in ("model", "data"):
            value = (self._setting(prefix) or {}).get("schema")
            if value:
                try:
                    schema = load_schema(value.as_dict() if hasattr(value, "as_dict") else value)
                except ValueError:
                    return
                break
        config.table_overrides({table: schema.features_of(table) for table in schema.table_names})

    def _check_strategy(self) -> None:
        """A TorchRec strategy built once ahead, so that its own checks stop a bad setting before the data module is
        built (jsonargparse builds the trainer's arguments later, and would bury the message)."""
        strategy = self._setting("trainer", {}).get("strategy")
        class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
        if not isinstance(class_path, str) or "." not in class_path:
            return
        module, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return  # jsonargparse reports it
        if not (isinstance(cls, type) and issubclass(cls, TorchRecStrategyBase)):
            return
        parser = LightningArgumentParser(exit_on_error=False)
        parser.add_argument("--strategy", type=Strategy)
        instantiate = getattr(parser, "instantiate", parser.instantiate_classes)  # the new name (jsonargparse 4.49)
        try:
            instantiate(Namespace(strategy=strategy))
        except ValueError as err:
            raise ConfigError(_qualify(str(err), "trainer.strategy", set(inspect.signature(cls).parameters))) from err


def _unlinked(err: BaseException) -> BaseException:
    """The error inside jsonargparse's "Call to compute_fn of link ... failed" (whose text repeats the data module)."""
    while str(err).startswith("Call to compute_fn of link") and err.__cause__ is not None:
        err = err.__cause__
    return err


def _table_sizes(datamodule: CriteoDataModule) -> list[int] | None:
    """Criteo's 26 table sizes (a data module with a feature schema sizes the model through ``model.schema``)."""
    return None if datamodule.schema is not None else datamodule.table_sizes


def _schema(datamodule: CriteoDataModule) -> dict[str, Any] | None:
    """The data's feature schema with every table sized, for the model (``None`` for raw Criteo files: the model's
    Criteo preset from ``num_embeddings_per_feature``, as before schemas)."""
    return None if datamodule.schema is None else datamodule.resolved_schema().to_dict()


def _data_error(err: BaseException) -> str:
    """An error of the data (preparing files, sizing tables) with the data module's arguments named as on the
    command line (`num_embeddings_per_feature` -> `data.num_embeddings_per_feature`)."""
    return _qualify(str(err), "data", set(inspect.signature(CriteoDataModule).parameters))


def _qualify(message: str, prefix: str, names: set[str]) -> str:
    """Write each backquoted argument in ``names`` as ``prefix.argument``."""

    def qualify(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"`{prefix}.{name}" if name in names else match.group(0)

    return re.sub(r"`(\w+)", qualify, message)


def _remove_unused_log_dir(cli: DQRMCLI | None) -> None:
    """A run that failed before it logged or saved anything leaves no ``version_N`` directory behind."""
    path = getattr(cli, "_new_log_dir", None)
    trainer = getattr(cli, "trainer", None)
    if path is not None and (trainer is None or trainer.is_global_zero):
        remove_if_unused(path)


def _quiet_known_warnings() -> None:
    """Silence third-party warnings that say nothing actionable to a dqrm user."""
    for message in (
        ".*IterableDataset.*has `__len__` defined.*",  # our IterableDataset partitions per worker itself
        ".*It is recommended to use `self.log.*sync_dist=True.*",  # metrics are synced by torchmetrics
        ".*Please use DTensor instead and we are deprecating ShardedTensor.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*`broadcast_buffers` is deprecated.*",
        ".*an autograd kernel was not registered to the Autograd key.*",
        # the data module stores and restores the loader position itself (CriteoDataModule.state_dict)
        ".*resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable.*",
        ".*You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a.*",
        # the predictions writer numbers rows by their positions in the split, not by Lightning's batch indices
        ".*Couldn't infer the batch indices fetched from your dataloader.*",
        # Lightning's all_gather (the predictions writer's row counts, several processes) calls a deprecated torch API
        ".*torch.distributed.nn.functional.all_gather is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    for name in ("torch.fx._symbolic_trace", "torchrec.distributed.utils", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("lightning.pytorch").handlers:  # Lightning's advertisement for its cloud logger
        handler.addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dqrm`` console script."""
    from_command_line = argv is None  # LightningCLI then reads sys.argv itself (given both, it warns)
    argv = list(sys.argv[1:] if argv is None else argv)
    remember_user_environment()
    die_with_torchrun_agent()
    _quiet_known_warnings()
    if argv and argv[0] in _TOOLS:
        _run_tool(argv[0], argv[1:])
        return
    from dqrm_lightning.export.artifact import ArtifactError

    command = f"dqrm {argv[0]}" if argv and not argv[0].startswith("-") else "dqrm"
    try:
        DQRMCLI(args=None if from_command_line else argv)
    except RunInterrupted as stop:
        _report_interrupted(stop, DQRMCLI.last, command)
    except BaseException as err:
        _remove_unused_log_dir(DQRMCLI.last)
        if isinstance(err, ConfigError | CheckpointError | ArtifactError):
            raise _one_line(command, err) from None
        if isinstance(err, argparse.ArgumentError):
            raise _one_line(command, err, _option_error(err, DQRMCLI.last, argv)) from None
        dead = _name_dead_ranks(DQRMCLI.last)
        if dead is not None:  # the cause, in one line: the traceback only shows this rank's broken connection
            raise _one_line(command, err, dead) from None
        raise
    _close_process_group()  # after a run that succeeded on every rank (a failed one exits with its own error)


def _run_tool(name: str, argv: list[str]) -> None:
    """``dqrm NAME ...`` for a subcommand beside LightningCLI's: its ``main(argv)`` returns the path it wrote, printed
    last; a mistake in the user's input (a missing file, a bad value) is one line."""
    module, label = _TOOLS[name]
    try:
        path = importlib.import_module(module).main(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise _one_line(f"dqrm {name}", err) from None
    print(f"{label}: {path}", flush=True)


def _one_line(command: str, err: BaseException, message: str | None = None) -> SystemExit:
    """The exit for a user's mistake: one line naming the argument or file. With ``DQRM_TRACEBACK=1`` in the
    environment the full traceback is printed first (for bug reports)."""
    if os.environ.get("DQRM_TRACEBACK", "") not in ("", "0"):
        traceback.print_exception(err)
    return SystemExit(f"{command}: error: {message if message is not None else err}")


def _report_interrupted(stop: RunInterrupted, cli: DQRMCLI | None, command: str) -> None:
    """One line saying where the run stopped and how to continue it; the summary line last; exit 128 + signal."""
    if stop.global_zero:
        hint = "; continue with the same command and `--ckpt_path last`" if stop.checkpoint else ""
        print(f"{command}: {stop}{hint}", file=sys.stderr, flush=True)
        summary = cli._summary_callback().path if cli is not None else None
        if summary is not None:
            print(f"summary: {summary}", flush=True)
    _close_process_group()
    raise SystemExit(stop.exit_code)


def _subcommand_keys(cli: DQRMCLI | None, subcommand: str) -> list[str]:
    """Every option of a subcommand (``data.batch_size``, ...), from a parse of its defaults."""
    parser = getattr(cli, "parser", None)
    if cli is None or parser is None or subcommand not in cli.subcommands():
        return []
    try:
        defaults = parser.parse_args([subcommand])
    except (argparse.ArgumentError, SystemExit):
        return []
    prefix = f"{subcommand}."
    return [key[len(prefix) :] for key in vars(defaults.as_flat()) if key.startswith(prefix)]


def _option_error(err: argparse.ArgumentError, cli: DQRMCLI | None, argv: list[str]) -> str:
    """A bad option or config key in one line, with the closest known key when there is one."""
    lines = [line.strip().lstrip("- ") for line in str(err).strip().splitlines() if line.strip()]
    message = lines[0] if lines else str(err)
    if message.endswith(":") and len(lines) > 1:  # jsonargparse: 'Parser key "k":' then the reasons, one per line
        message = f"{message} {lines[1]}"
    bad = re.search(r"option '([\w.]+)'|unrecognized arguments: --([\w.]+)", message)
    keys = _subcommand_keys(cli, argv[0]) if bad and argv else []
    close = difflib.get_close_matches(bad.group(1) or bad.group(2), keys, n=1, cutoff=0.8) if bad else []
    if close:
        message += f"; did you mean `{close[0]}`?"
    prog = f"dqrm {argv[0]}" if argv and not argv[0].startswith("-") else "dqrm"
    return f"{message} (`{prog} --help` lists the options)"


def _name_dead_ranks(cli: DQRMCLI | None, wait_seconds: float = 5.0) -> str | None:
    """The line naming the ranks that died, which a surviving rank only sees as a broken connection: the ones
    Lightning's launcher started here and that exited, else (torchrun, SLURM, other nodes) the ones whose heartbeats
    stopped (:class:`~dqrm_lightning.strategies.peers.PeerWatch`); None when every rank is alive."""
    trainer = getattr(cli, "trainer", None)
    strategy = getattr(trainer, "strategy", None)
    launcher = getattr(strategy, "launcher", None)
    deadline = time.monotonic() + wait_seconds
    exited = []
    first = getattr(strategy, "node_rank", 0) * getattr(strategy, "num_processes", 1)  # this node's first rank
    for local_rank, process in enumerate(getattr(launcher, "procs", None) or [], start=1):
        try:
            code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            continue
        if code:
            exited.append(f"rank {first + local_rank} terminated with code {code}")
    if exited:
        return f"{'; '.join(exited)}; the run stopped"
    peers = getattr(strategy, "peers", None)
    if peers is None:
        return None
    dead = peers.dead()
    if dead is None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return f"lost the run's rendezvous store at {where} (hosted on node 0): node 0 stopped; the run stopped"
    if dead:
        return f"{', '.join(dead)} stopped (its process ended or its node was lost); the run stopped"
    return None


def _close_process_group() -> None:
    """Shut the process group down before the interpreter exits.

    gloo's worker threads free each finished collective's tensors, which needs the GIL; one that does so while the
    interpreter finalizes aborts the process ("terminate called without an active exception") after the run has
    finished. So every rank waits at a barrier, destroys the group, and lets those threads finish first.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    time.sleep(0.2)  # the GIL is free: gloo's threads release what they hold


if __name__ == "__main__":
    main()
