"""Typed configuration: one dataclass per verb, whose field docs are the `--help` text and the YAML reference.

Every training verb takes `--config FILE.yaml`; every key can also be given on the command line
(`--learning-rate 1e-4` or `learning_rate=1e-4`), which wins over the file. `config.options` declares the
fields and loads and checks them; `config.train` and `config.apply` hold the verbs' configs, all importable
from here (`from lmtune.config import FinetuneConfig`). Nothing heavy is imported: `lmtune --help` must stay fast.
"""

from lmtune.config.apply import (ChatConfig, EvaluateConfig, ExportConfig, GenerateConfig, MergeConfig,
                                 PredictConfig, ProbeConfig, ReportConfig, ServeConfig, StudioConfig)
from lmtune.config.train import (DemoConfig, EstimateConfig, FinetuneConfig, PrepareConfig, PretrainConfig,
                                 SweepConfig, TaskOptions, TrainConfig)

__all__ = ["ChatConfig", "DemoConfig", "EstimateConfig", "EvaluateConfig", "ExportConfig", "FinetuneConfig",
           "GenerateConfig", "MergeConfig", "PredictConfig", "PrepareConfig", "PretrainConfig", "ProbeConfig",
           "ReportConfig", "ServeConfig", "StudioConfig", "SweepConfig", "TaskOptions", "TrainConfig"]
