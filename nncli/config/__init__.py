"""The config file: YAML read with the line of every key, the schema of every section, `--set`.

Torch-free, and it imports no later stage of the pipeline (model, data, optim, run): they read
their sections from the `Config` this package returns.
"""
from nncli.config.config import Config, config_from_mapping, data_paths, read_config, shown_path

__all__ = ["Config", "config_from_mapping", "data_paths", "read_config", "shown_path"]
