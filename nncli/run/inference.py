"""`nncli eval` and `nncli predict`: a trained model from a checkpoint or run directory."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nncli.config import Config, config_from_mapping
from nncli.config.config import check_data_section
from nncli.config.schema import is_pair
from nncli.data import images
from nncli.data.checks import check_targets, check_token_ids, token_id_problem
from nncli.data.images import CHANNELS, IMAGE_SUFFIXES, is_image_file
from nncli.data.load import Data, in_target_units
from nncli.data.samples import Samples, TensorPair, normalize
from nncli.data.sources import read_csv_rows
from nncli.errors import ConfigError, option_error
from nncli.model.plan import ModelPlan, input_dtype, plan_model, plan_to_check
from nncli.optim.losses import create_loss, takes_class_labels
from nncli.optim.metrics import ClassAccuracy
from nncli.plugins import load_plugins
from nncli.run.checkpoint import find_checkpoint, fitting_its_config, load_checkpoint
from nncli.run.devices import resolve_device
from nncli.run.loop import eval_batch_size, evaluate
from nncli.run.setup import load_data, located_errors, resolve


@dataclass(frozen=True)
class Named:
    """What the user named on the command line for a checkpoint's config to use: the plugins to
    import (`--plugin`) and the paths its data may be read from (`--trust-data`). A checkpoint's
    config imports and reads nothing else (see Config)."""

    plugins: tuple[str, ...] = ()
    trusted_data: tuple[Path, ...] = ()


def config_of(ckpt: dict, file: Path, overrides: list[str] = (), named: Named = Named()) -> Config:
    """The resolved config stored in the checkpoint `file`; relative paths stay relative to the
    original. Errors name the run's config.yaml beside the file (the same text), else the file."""
    imported = load_plugins(list(named.plugins), Path.cwd(), option_error("--plugin"))
    beside = file.parent / "config.yaml"
    return resolve(config_from_mapping(
        ckpt["config"], overrides=overrides, path=beside if beside.is_file() else None,
        label=None if beside.is_file() else f"{file} (its stored config)",
        base_dir=Path(ckpt.get("config_dir", ".")),
        plugins_given=imported, trusted_data=[Path(p).expanduser().resolve() for p in named.trusted_data]))



def load_trained(path: Path, device: str | None = None,
                 named: Named = Named()) -> tuple[dict, Config, ModelPlan]:
    """The checkpoint (best.pt first in a run directory), its config, and the plan whose model
    holds the checkpoint's weights, in eval mode."""
    file = find_checkpoint(path, prefer=("best.pt", "last.pt"))
    ckpt = load_checkpoint(file)
    config = config_of(ckpt, file, named=named)
    plan = planned_with_its_weights(ckpt, config, file)
    if any(t.is_meta for t in plan.model.state_dict().values()):  # a large model: now built on the CPU
        plan = plan_model(config, ckpt["input_shape"], device="cpu")
        plan.model.load_state_dict(ckpt["model"])
    with located_errors(config, device):
        target = resolve_device("cpu" if device is None else device)
    plan.model.to(target).eval()
    return ckpt, config, plan


def planned_with_its_weights(ckpt: dict, config: Config, file: Path) -> ModelPlan:
    """The plan of the checkpoint's model (plan_to_check: on the CPU when small, else on the meta
    device), its weights loaded into it: tensors whose names or shapes do not fit are refused
    before a model is built to hold them, so a config edited to a huge layer allocates nothing."""
    plan = plan_to_check(config, ckpt["input_shape"])
    with fitting_its_config(file), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that a copy onto the meta device does nothing
        plan.model.load_state_dict(ckpt["model"])
    return plan


def evaluate_checkpoint(path: Path, data_file: Path | None = None, device: str | None = None,
                        named: Named = Named()) -> tuple[dict, str]:
    """Loss and metrics on the run's validation data, or on `data_file` (a file, or a folder of
    images) read with its settings; for a classifier also `per_class`: each class's samples and
    accuracy, by name when the run's classes have names."""
    ckpt, config, plan = load_trained(path, device, named)
    model = plan.model
    target = next(model.parameters()).device
    targets = ckpt.get("target_normalization")
    if data_file is None:
        data = load_data(config, ckpt.get("normalization"), target_normalization=targets)
        if data.val is None:
            raise ConfigError("the run has no validation data (val_split: 0); give --data FILE",
                              file=str(path))
        pair, source = data.val, "validation data"
        if ckpt.get("data_fingerprint") not in (None, data.fingerprint):
            warnings.warn("the run's data has changed since it was trained (a data file was edited "
                          "or replaced?); these results are not comparable with its metrics.csv")
    else:
        pair = _read_data_file(config, Path(data_file), ckpt["input_shape"], plan.output_shape[1:])
        source = str(data_file)
        if list(pair.x.shape[1:]) != list(ckpt["input_shape"]):
            raise ConfigError(f"its samples have shape {list(pair.x.shape[1:])}, but the model takes "
                              f"{list(ckpt['input_shape'])}", file=str(data_file))
        pair = replace(pair.normalized(ckpt.get("normalization")), y=normalize(pair.y, targets))
    output_shape = tuple(plan.output_shape[1:])
    pair = _checked_targets(pair, model, output_shape, config, source if data_file else str(path))
    classifier = takes_class_labels(config) and output_shape
    per_class = [ClassAccuracy(target, output_shape[0])] if classifier else []
    # as the run's own validation did, so that the numbers agree with its metrics.csv
    results: dict = evaluate(model, pair.to(target), create_loss(config).to(target), config["metrics"],
                             eval_batch_size(config), config["amp"], targets, per_class)
    if per_class:
        names = ckpt.get("classes")
        results["per_class"] = [{"class": names[i] if names else i, "samples": n, "accuracy": accuracy}
                                for i, (n, accuracy) in enumerate(per_class[0].accuracies())]
    return results, source


def _checked_targets(pair: Samples, model: nn.Module, output_shape: tuple, config: Config,
                     where: str) -> Samples:
    """Targets shaped as in training ((N,) -> (N, 1) for a one-output regression, else the loss
    broadcasts and reports a wrong number), labels within the model's classes, token ids within
    its Embedding."""
    data = Data(pair, None, tuple(pair.x.shape[1:]), None)
    try:
        check_targets(data, output_shape, config)
        check_token_ids(data, model, config)
    except ConfigError as err:
        raise ConfigError(err.message.removeprefix("training "), file=where, hint=err.hint) from None
    return data.train


def _read_data_file(config: Config, path: Path, input_shape: list[int], output_shape: tuple) -> TensorPair:
    """A .csv or .npz file, or a folder of class folders of images, read with the run's data
    settings (target column, array names, image mode, class names)."""
    section = dict(config["data"] or {})
    own = dict(section["train"]) if is_pair(section) else section  # the training source's settings
    kind = "images" if path.is_dir() else {".csv": "csv", ".npz": "npz"}.get(path.suffix.lower())
    if kind is None:
        hint = "Put the inputs and targets in one .npz: numpy.savez('data.npz', x=x, y=y)." \
            if path.suffix.lower() == ".npy" else None
        raise ConfigError("--data takes a .csv or .npz file, or a folder of class folders of images",
                          file=str(path), hint=hint)
    if kind != "images" and not path.is_file():  # else the data section's message, about paths in a config
        raise ConfigError("file not found; check the path", file=str(path))
    mode = image_mode(own, input_shape, "--data") if kind == "images" else None  # the run's, if it had one
    if own.get("source") != kind:
        own = {"source": kind, "target": "target"} if kind == "csv" else {"source": kind}
    if kind == "images":  # converted and resized to what the model takes
        own.update(root=str(path.resolve()), mode=mode, size=list(input_shape[1:]), cache=False)
    else:  # a CSV's columns are taken by name: the `features` the run recorded (else every column but
        # the targets, as training took them)
        own.update(path=str(path.resolve()))
    # labels that are names map to the run's classes; integer classes are named by their numbers
    classes = section.get("class_names")
    if classes is None and kind == "images" and takes_class_labels(config) and output_shape:
        classes = [str(i) for i in range(output_shape[0])]
    own.update(val_split=0, normalize=False, normalize_target=False, augment=None, class_names=classes,
               loader="memory", workers=0)
    # the user's own file: the only path read
    with_file = replace(config, values={**config.values, "data": own}, trusted_data=[path.resolve()])
    try:
        check_data_section(with_file)
        data = load_data(with_file, scan=False)
    except ConfigError as err:  # about the --data file, not about a line of the run's config
        raise ConfigError(err.message, file=str(path), hint=err.hint) from None
    return data.train


def image_mode(source: dict, input_shape: list[int], option: str) -> str:
    """The Pillow mode images are read in for a model: its run's (an images source), else the one
    with the model's channels (L: 1, RGB: 3)."""
    if source.get("source") == "images":
        return source["mode"]
    mode = next((mode for mode, channels in CHANNELS.items() if [channels] == input_shape[:1]), None)
    if mode is None or len(input_shape) != 3:
        raise ConfigError(f"the model takes samples of shape {input_shape}, not images of 1 or 3 channels "
                          "(channels, height, width)", key=option)
    return mode


def parse_inputs(inputs: str, config: Config,
                 input_shape: list[int]) -> tuple[torch.Tensor, list[Path] | None]:
    """`--input`: a JSON list of samples, a .json, .csv, .npy or .npz file, an image file or a
    folder of them (read in the run's image mode, resized to the model's input). The inputs as the
    model takes them, before normalization; and for images, their files."""
    text = inputs.strip()
    path = Path(text)
    if not text.startswith("[") and (path.is_dir() or is_image_file(path)):
        return _read_images(path, config, input_shape)
    if text.startswith("["):
        try:
            array = np.asarray(json.loads(text), dtype=np.float64)
        except (json.JSONDecodeError, ValueError) as err:
            raise ConfigError(f"not a JSON list of numbers: {err}", key="--input") from None
    else:
        if not path.is_file() and path.suffix.lower() in (".json", ".csv", ".npy", ".npz"):
            raise ConfigError("no such file", file=str(path), key="--input")
        if not path.is_file():
            raise ConfigError("is neither a JSON list of samples nor a file; give e.g. "
                              "--input '[[0.1, 0.2, 0.3]]', a .json, .csv, .npy or .npz file, an image or "
                              "a folder of images", key="--input")
        try:
            suffix = path.suffix.lower()
            if suffix == ".json":
                array = np.asarray(json.loads(path.read_text()), dtype=np.float64)
            elif suffix == ".csv":
                array = _read_input_csv(path, config)
            elif suffix == ".npy":
                array = np.load(path, allow_pickle=False).astype(np.float64)
            elif suffix == ".npz":
                arrays = np.load(path, allow_pickle=False)
                name = (config["data"] or {}).get("x", "x")
                array = arrays[name if name in arrays.files else arrays.files[0]].astype(np.float64)
            else:
                raise ConfigError("--input takes a .json, .csv, .npy or .npz file, an image "
                                  f"({', '.join(IMAGE_SUFFIXES)}) or a folder of images", file=str(path))
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"cannot read the inputs: {err}", file=str(path)) from None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ConfigError("the inputs hold NaN or infinite values", key="--input")
    per_sample = int(np.prod(input_shape))
    if array.size % per_sample or array.size == 0:
        raise ConfigError(f"{array.size} numbers given, not a whole number of samples of shape "
                          f"{input_shape} ({per_sample} numbers each)", key="--input")
    row = int(np.prod(array.shape[1:])) if array.ndim >= 2 else 1
    if array.size != per_sample and array.ndim >= 2 and row != per_sample:
        raise ConfigError(f"each input has {row} numbers (shape {list(array.shape[1:])}), but the model "
                          f"takes samples of shape {input_shape} ({per_sample} numbers each)",
                          key="--input")
    x = torch.from_numpy(np.ascontiguousarray(array)).reshape(-1, *input_shape)
    dtype = input_dtype(config)  # read as float64, then as the model takes them
    if not dtype.is_floating_point and not torch.equal(x, x.round()):
        raise ConfigError("the model takes whole numbers "
                          f"(model.input_dtype: {config['model']['input_dtype']}, "
                          "e.g. token ids), and the inputs hold fractions", key="--input")
    return x.to(dtype), None


def _read_images(path: Path, config: Config, input_shape: list[int]) -> tuple[torch.Tensor, list[Path]]:
    """An image file, or every image in a folder (its subfolders too), as the model takes them:
    the run's image mode, resized to the model's input, pixels in [0, 1]."""
    section = config["data"] or {}
    source = section["train"] if is_pair(section) else section
    mode = image_mode(source, input_shape, "--input")
    if not path.exists():
        raise ConfigError("no such file", file=str(path), key="--input")
    files = images.images_under(path) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"holds no images ({', '.join(IMAGE_SUFFIXES)})", file=str(path), key="--input")
    try:
        pixels = images.decode_images(files, mode, tuple(input_shape[1:]))
    except images.ImageProblem as err:
        raise ConfigError(str(err), key="--input", hint=err.hint) from None
    return torch.from_numpy(pixels).to(input_dtype(config)) / 255, files  # as training's as_input makes them


def _read_input_csv(path: Path, config: Config) -> np.ndarray:
    """A CSV of inputs with a header row. For a run trained on a CSV, its feature columns are
    taken by name (so the training file itself, target column and all, can be given)."""
    section = dict(config["data"] or {})
    section = dict(section["train"]) if is_pair(section) else section
    delimiter = section.get("delimiter", ",") if section.get("source") == "csv" else ","
    header, body = read_csv_rows(path, delimiter)
    if not body:
        raise ConfigError("expected a header row and at least one row of inputs", file=str(path))
    columns = list(range(len(header)))
    if section.get("source") == "csv":
        targets = section["target"] if isinstance(section["target"], list) else [section["target"]]
        features = section.get("features") or [name for name in header if name not in targets]
        index = {name: i for i, name in reversed(list(enumerate(header)))}  # a name's first column
        if features and all(name in index for name in features):
            columns = [index[name] for name in features]
    return np.array([[float(r[c]) for c in columns] for r in body], dtype=np.float64)


def predict_checkpoint(path: Path, inputs: str, device: str | None = None,
                       named: Named = Named()) -> list[dict]:
    """One row per input: the model's output (in the targets' units, for a run with
    normalize_target), for a classifier its class (a name when the run's labels were names, with
    `class_index`), and for an image its `file`."""
    ckpt, config, plan = load_trained(path, device, named)
    model = plan.model
    x, files = parse_inputs(inputs, config, ckpt["input_shape"])
    if (problem := token_id_problem(x, model)) is not None:
        raise ConfigError(problem, key="--input")
    x = normalize(x, ckpt.get("normalization"))
    device = next(model.parameters()).device
    with torch.no_grad():  # in batches of the run's validation size: a folder may hold many images
        out = torch.cat([model(chunk.to(device)).cpu() for chunk in x.split(eval_batch_size(config))])
    out = in_target_units(out, ckpt.get("target_normalization"))
    classifier, names = takes_class_labels(config), ckpt.get("classes")
    rows = []
    for i, row in enumerate(out):
        entry = {"file": str(files[i])} if files else {}
        entry["output"] = row.reshape(-1).tolist()  # float32 values, exactly
        if classifier:
            index = int(row.argmax())
            entry["class"] = names[index] if names else index
            if names:
                entry["class_index"] = index
        rows.append(entry)
    return rows
