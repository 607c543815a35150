"""Plugins: the user's own Python files or modules that register layers and losses.

They are code, imported with the user's rights: a config file's `plugins:` (the user's own
config) and `--plugin` options are imported; a checkpoint's stored plugin names never are.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from nncli.errors import ConfigError

IMPORTED: set[str] = set()  # every plugin this process imported: nncli.process writes what they leave open


def load_plugins(plugins: list[str], base_dir: Path, error: Callable[..., ConfigError]) -> list[str]:
    """Import each plugin (a .py file relative to `base_dir`, or a module name) once; return what
    was imported: each file's resolved path, or the module's name."""
    imported = []
    for i, plugin in enumerate(plugins):
        try:
            if plugin.endswith(".py"):
                path = (base_dir / plugin).resolve()
                if not path.is_file():
                    raise error(f"plugin file {plugin} not found in {base_dir}", "plugins", i)
                imported.append(str(path))
                module_name = f"nncli_plugin_{path.stem}_{abs(hash(str(path)))}"
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
                IMPORTED.add(str(path))
            else:
                importlib.import_module(plugin)
                imported.append(plugin)
                IMPORTED.add(plugin)
        except ConfigError:
            raise
        except SystemExit as err:  # else the command would end there, with the plugin's status
            raise error(f"plugin '{plugin}' called sys.exit({err.code!r}) while being imported; a plugin "
                        "defines and registers layers and losses", "plugins", i,
                        hint="Remove the call, or put the script part of the file under "
                             "if __name__ == '__main__':.") from None
        except ModuleNotFoundError as err:
            if plugin.endswith(".py") or err.name != plugin.split(".")[0]:  # the plugin's own import failed
                raise error(f"plugin '{plugin}' raised ModuleNotFoundError: {err}", "plugins", i,
                            hint=f"Install {err.name}, or remove its import from the plugin.") from None
            raise error(f"cannot import plugin '{plugin}': {err}", "plugins", i,
                        hint="Give a .py file or the name of an installed module.") from None
        except Exception as err:  # a plugin's own bug: say which plugin and what it raised
            raise error(f"plugin '{plugin}' raised {type(err).__name__}: {err}", "plugins", i) from None
    return imported
