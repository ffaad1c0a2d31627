"""Synthetic click logs in the raw Criteo Display Advertising format, with a known click model.

:func:`synthesize` streams any number of rows into ``train.tsv`` / ``val.tsv`` / ``test.tsv`` written exactly like the
raw Criteo files (40 tab-separated fields: label, ``I1..I13`` integer counts, ``C1..C26`` 8-digit lowercase hex
values, empty fields for missing values, no header, no quoting, ``\\n`` line ends). Beside every data file,
``<file>.truth.npy`` holds the true click probability of each of its rows, and ``truth.json`` gives per split the
accuracy ceiling: the Bayes-optimal AUC and log loss of the true probabilities against the sampled labels.

The package, one concept per module:

* :mod:`.presets`: the knobs of the click model (:class:`SyntheticPreset`) and the named :data:`PRESETS`;
* :mod:`.zipf`: popularity ranks of ids from a rank-Zipf law;
* :mod:`.truth`: the ground-truth click model (:class:`GroundTruth`), which samples rows and scores them;
* :mod:`.bayes`: the Bayes-optimal AUC and log loss of a split, in constant memory;
* :mod:`.writer`: rows as raw Criteo text, and data files written beside their true probabilities;
* :mod:`.plan`: which rows go to which split, file and generation block;
* :mod:`.generate`: :func:`synthesize` and ``python -m dqrm_lightning.data.synthetic``;
* :mod:`.schema_truth` and :mod:`.parquet`: the click model of any feature schema, and :func:`synthesize_schema`,
  which writes it as Parquet files (``dqrm data synth --schema``).
"""

from dqrm_lightning.data.synthetic.generate import main, synthesize
from dqrm_lightning.data.synthetic.parquet import synthesize_schema
from dqrm_lightning.data.synthetic.plan import BLOCK_ROWS
from dqrm_lightning.data.synthetic.presets import (
    CRITEO_CAT_MISSING_RATES,
    CRITEO_CTR,
    CRITEO_DENSE_MISSING_RATES,
    DEMO_CARDINALITIES,
    HARD_CARDINALITIES,
    KAGGLE_CARDINALITIES,
    PRESETS,
    TERABYTE_CARDINALITIES,
    SyntheticPreset,
    get_preset,
)
from dqrm_lightning.data.synthetic.schema_truth import SchemaGroundTruth, SchemaSynthOptions
from dqrm_lightning.data.synthetic.truth import GroundTruth, SyntheticRows
from dqrm_lightning.data.synthetic.writer import format_rows

__all__ = [
    "BLOCK_ROWS",
    "CRITEO_CAT_MISSING_RATES",
    "CRITEO_CTR",
    "CRITEO_DENSE_MISSING_RATES",
    "DEMO_CARDINALITIES",
    "HARD_CARDINALITIES",
    "KAGGLE_CARDINALITIES",
    "PRESETS",
    "TERABYTE_CARDINALITIES",
    "GroundTruth",
    "SchemaGroundTruth",
    "SchemaSynthOptions",
    "SyntheticPreset",
    "SyntheticRows",
    "format_rows",
    "get_preset",
    "main",
    "synthesize",
    "synthesize_schema",
]
