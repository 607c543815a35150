"""Setting a run up from its config, in the same phases for every command:

1. resolve (`load_config`): read the config file (nncli.config) and fill in what the registries
   decide: `metrics:` left out is accuracy for a loss that takes class labels, none otherwise.
2. build (`build`): the loss, the data, and the model's shape plan: on the meta device (no
   memory) to check a config, on the CPU to train it.
3. cross-check (`cross_check`): the data against the model: targets shaped as its output, labels
   within its classes, token ids within its Embedding, a loss that computes, top<k> below the
   classes.
4. place (`prepare_run`): on the device, in the process group, wrapped for DataParallel, DDP or
   torch.compile; then the optimizer, its groups and the schedule on the placed model (some
   optimizers, Adagrad's, make their state on the parameters' device at once).

`validate`, `summary`, `--nproc`'s check before it starts its processes, and `resume`'s all run
phases 1-3 and build the optimizer on the planned model (`check_config`); `train` runs all four.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nncli.config import Config, read_config
from nncli.config.yamlio import to_plain
from nncli.data.augment import Pipeline, create_pipeline
from nncli.data.checks import check_targets, check_token_ids
from nncli.data.load import Data, read_data
from nncli.data.samples import Batches, Samples
from nncli.dynamo_free import skip_dynamo
from nncli.errors import ConfigError, out_of_memory_as_error
from nncli.model.plan import ModelPlan, input_dtype, plan_model, plan_to_check
from nncli.optim.ema import WeightAverage
from nncli.optim.losses import check_loss_computes, create_loss, loss_name, takes_class_labels
from nncli.optim.metrics import TOPK, check_metrics
from nncli.optim.optimizers import ParamGroup, create_optimizer
from nncli.optim.schedules import create_schedule
from nncli.report.loggers import check_loggers
from nncli.run.devices import (
    Process,
    check_parallel,
    configure_determinism,
    grad_scaler,
    resolve_device,
    start_process,
    wrap_model,
)
from nncli.run.state import Run

# --- 1. resolve --------------------------------------------------------------------------------

def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read and check a config file (`overrides` are `--set KEY=VALUE` strings), then resolve it."""
    return resolve(read_config(path, overrides))


def resolve(config: Config) -> Config:
    """Fill in what the registries decide: the default metrics, by the loss's targets."""
    if config["metrics"] is None:
        config.values["metrics"] = ["accuracy"] if takes_class_labels(config) else []
    return config


# --- 2. build ----------------------------------------------------------------------------------

@dataclass
class Parts:
    """What a config builds before it is placed on a device."""

    loss_fn: nn.Module
    data: Data | None
    plan: ModelPlan
    augment: Pipeline | None = None  # data.augment, built by cross_check (it needs the model's classes)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators. rich draws from Python's when first imported
    (rich.style), which a run that prints would do after this: imported first, so that the states
    saved in checkpoints do not depend on --quiet."""
    import rich.style  # noqa: F401

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(config: Config, normalization: dict | None = None, *, scan: bool = True,
              target_normalization: dict | None = None) -> Data:
    """The config's data (nncli.data.load.read_data), its targets as its loss takes them: class
    labels as integers, checked to be whole numbers, when the loss takes class labels."""
    return read_data(config, normalization, scan=scan, target_normalization=target_normalization,
                     labels_for=loss_name(config) if takes_class_labels(config) else None)


def build(config: Config, *, to_train: bool = False, normalization: dict | None = None,
          target_normalization: dict | None = None, batch_size: int = 1, count_macs: bool = False) -> Parts:
    """The loss, the data and the model's plan. `to_train`: the data is scanned (fingerprint,
    statistics) and the model built on the CPU, its weights initialised from the seed alone, as a
    hand-written script's would be, whatever device it trains on. Else the config is only checked:
    the data is read but not scanned (a mapped file is not read), and the model planned as
    `plan_to_check` does, for a batch of `batch_size` (MACs counted with `count_macs`).
    `normalization`, `target_normalization`: a resumed checkpoint's statistics."""
    loss_fn = create_loss(config)  # first: the labels' checks depend on the loss
    check_metrics(config, takes_class_labels(config))
    data = None
    if config["data"] is not None:
        data = load_data(config, normalization, scan=to_train, target_normalization=target_normalization)
    shape = _input_shape(config, data)
    seed_everything(config["seed"])
    if not to_train:
        return Parts(loss_fn, data, plan_to_check(config, shape, batch_size, count_macs))
    with out_of_memory_as_error("building the model on the CPU", "`nncli summary` shows its size without "
                                "building it; use a smaller model, or a machine with more memory."):
        plan = plan_model(config, input_shape=shape, device="cpu")
    return Parts(loss_fn, data, plan)


def _input_shape(config: Config, data: Data | None) -> tuple | None:
    declared = config["model"]["input_shape"]
    if data is None:
        return declared
    if declared is not None and tuple(declared) != data.sample_shape:
        raise config.error(f"is {list(declared)}, but the data's samples have shape "
                           f"{list(data.sample_shape)}", "model", "input_shape",
                           hint="Leave input_shape out and nncli takes it from the data.")
    return data.sample_shape


def build_model(config: Config, input_shape: tuple | list | None = None,
                device: str | torch.device = "cpu") -> nn.Sequential:
    """The config's network as a plain `nn.Sequential`, its weights initialised as torch does.
    Without `input_shape` or `model.input_shape`, the data section tells the shape."""
    if input_shape is None and config["model"]["input_shape"] is None and config["data"] is not None:
        input_shape = load_data(config, scan=False).sample_shape
    return plan_model(config, input_shape, device=device).model


def make_batches(config: Config, train: Samples, process: Process) -> Batches:
    """The training batches of this process; an error when `batch_size` leaves none."""
    train_cfg = config["train"]
    batches = Batches(train, train_cfg["batch_size"], shuffle=train_cfg["shuffle"], seed=config["seed"],
                      drop_last=train_cfg["drop_last"], rank=process.rank, world_size=process.world_size)
    if len(batches) == 0:
        raise config.error(f"batch_size {train_cfg['batch_size']} leaves no full batch of the "
                           f"{batches.samples} training samples per process", "train", "batch_size")
    return batches


def optimizer_steps(config: Config, batches: Batches) -> int:
    """Optimizer steps per epoch: one per `train.accumulate` batches, and one for a rest."""
    return -(-len(batches) // config["train"]["accumulate"])


# --- 3. cross-check ----------------------------------------------------------------------------

def cross_check(config: Config, parts: Parts) -> None:
    """The data, the loss and the metrics against the planned model: targets shaped as its output,
    token ids within its Embedding, a loss that computes, top<k> below its classes; and a warning
    for a Softmax before CrossEntropyLoss."""
    output_shape = parts.plan.output_shape[1:]
    if parts.data is not None:
        check_targets(parts.data, output_shape, config)
        check_token_ids(parts.data, parts.plan.model, config)
        check_loss_computes(parts.loss_fn, config, output_shape, parts.data.train.y)
    classes = output_shape[0] if len(output_shape) == 1 else None
    for i, name in enumerate(config["metrics"]):
        if classes and (top := TOPK.match(name)) and int(top.group(1)) >= classes:
            raise config.error(f"{name} is always 1 for a model with {classes} classes; k must be below "
                               f"{classes}", "metrics", i)
    if parts.data is not None:
        parts.augment = check_augmentation(config, parts.data.sample_shape,
                                           classes if takes_class_labels(config) else None)
    warn_of_softmax_before_cross_entropy(config, parts.plan)


def check_augmentation(config: Config, sample_shape: tuple, classes: int | None) -> Pipeline | None:
    """`data.augment` built and checked against the samples and the model (nncli.data.augment):
    float inputs, and for MixUp and CutMix, whose targets are class probabilities, a loss that
    takes them."""
    if config["data"]["augment"] and not input_dtype(config).is_floating_point:
        raise config.error(f"transforms float inputs, but the model takes {config['model']['input_dtype']} "
                           "(token ids)", "data", "augment")
    pipeline = create_pipeline(config, sample_shape, classes)
    if pipeline is not None and pipeline.soft_targets and loss_name(config) != "CrossEntropyLoss":
        index = next(i for i, t in enumerate(pipeline.transforms) if t.batch_level)
        raise config.error(f"{pipeline.transforms[index].name} gives soft targets (class probabilities), "
                           f"which CrossEntropyLoss takes and {loss_name(config) or 'this loss'} does not",
                           "data", "augment", index, hint="Use loss: CrossEntropyLoss.")
    return pipeline


def warn_of_softmax_before_cross_entropy(config: Config, plan: ModelPlan) -> None:
    """A Softmax or LogSoftmax as the last layer before CrossEntropyLoss (a Keras habit): the
    loss takes scores (logits) and applies log-softmax itself, so nothing fails, but after a
    Softmax the model trains worse, without a word."""
    if loss_name(config) != "CrossEntropyLoss" or not plan.layers:
        return
    last = plan.layers[-1]
    # a block's last layer is the model's (not a Residual's)
    while last.type == "Sequential" and last.children:
        last = last.children[-1]
    if last.type == "Softmax":
        why = ("CrossEntropyLoss applies log-softmax to the model's output itself, so it takes these "
               "probabilities for scores: the gradients shrink and the model trains worse")
        hint = ("Drop the Softmax: the model then outputs scores (logits), with the same predicted class; "
                "or end with LogSoftmax and use loss: NLLLoss.")
    elif last.type == "LogSoftmax":
        why = "CrossEntropyLoss applies log-softmax to the model's output itself, so it is done twice"
        hint = ("Use loss: NLLLoss, the loss that takes log-probabilities (the same loss, done once); "
                "or drop the LogSoftmax.")
    else:
        return
    warnings.warn(str(ConfigError(f"the model ends with {last.type}, and {why}", file=config.source,
                                  line=last.line, key=f"{last.path} ({last.type})", hint=hint)))


def check_config(config: Config, processes: int = 1, *, batch_size: int = 1,
                 count_macs: bool = False) -> tuple[ModelPlan, list[ParamGroup]]:
    """Every check possible without training (`nncli validate` and `summary`, and `--nproc`
    before it starts its `processes`): phases 1-3 without training weights (see build), then the
    optimizer and its groups against the model's parameters and the schedule. Without data the
    schedule is checked as if an epoch were one step (a run takes at least that many). Returns the
    plan (for a batch of `batch_size`, with MACs when `count_macs`) and the optimizer groups."""
    with located_errors(config):
        check_parallel(config["parallel"], processes)
    check_loggers(config)
    parts = build(config, batch_size=batch_size, count_macs=count_macs)
    cross_check(config, parts)
    skip_dynamo()  # nothing is compiled here
    optimizer, groups = create_optimizer(parts.plan.model, config)
    steps = None
    if parts.data is not None:
        steps = optimizer_steps(config, make_batches(config, parts.data.train, Process(0, processes)))
    create_schedule(optimizer, config, steps)
    return parts.plan, groups


@contextlib.contextmanager
def located_errors(config: Config, device_option: str | None = None) -> Iterator[None]:
    """The device module's errors name a key; say where its value came from: the config's line,
    or `--device` when that option gave the device."""
    try:
        yield
    except ConfigError as err:
        if device_option is not None and err.key == "device":
            raise ConfigError(err.message, key="--device", hint=err.hint) from None
        raise config.error(err.message, err.key, hint=err.hint) from None


def check_device(config: Config, device: str | None, processes: int) -> None:
    """The device (`--device`, else the config's) is there for `processes` processes."""
    with located_errors(config, device):
        resolve_device(config["device"] if device is None else device, processes=processes)


def check_launch(config: Config, device: str | None, processes: int) -> None:
    """What `--nproc N` checks once before it starts N processes (which would each say it): the
    config, as `validate` does, and the device for N processes."""
    check_config(config, processes)
    check_device(config, device, processes)


# --- 4. place ----------------------------------------------------------------------------------

def prepare_run(config: Config, *, device: str | None = None, run_dir: Path | None = None,
                epochs: int | None = None, notice: Callable[[str], None] = print,
                normalization: dict | None = None, target_normalization: dict | None = None) -> Run:
    """Every phase: a run ready to train; nothing is trained yet. `normalization`,
    `target_normalization`: a resumed checkpoint's statistics (see load_data)."""
    with located_errors(config, device):
        target_device = resolve_device(config["device"] if device is None else device)
        if target_device.type == "cuda":  # the current GPU too: pinned copies, CUDA graphs and NCCL use it
            torch.cuda.set_device(target_device)
        process = start_process(config["parallel"], target_device)
    if process.world_size > 1:
        config.values["parallel"] = "ddp"  # implied by several processes: config.yaml says what ran
    configure_determinism(config["deterministic"], target_device)
    check_loggers(config)
    if config["data"] is None:
        raise config.error("the config has no 'data' section; add one, e.g. data: {source: digits}")
    parts = build(config, to_train=True, normalization=normalization,
                  target_normalization=target_normalization)
    cross_check(config, parts)
    with out_of_memory_as_error(f"moving the model and data to {target_device}",
                                "The data and the model must fit in the device's memory together: "
                                "set data.loader: dataloader to keep the data on the host, or use a "
                                "smaller model, or device: cpu."):
        model = parts.plan.model.to(target_device)
        train_data = parts.data.train.to(target_device)
        val = parts.data.val.to(target_device) if parts.data.val is not None else None
    if val is not None and process.world_size > 1:
        val = val.subset(slice(process.rank, None, process.world_size))  # each process validates its share
    with located_errors(config):
        step_model = wrap_model(model, parallel=config["parallel"], device=target_device,
                                device_ids=config["device_ids"], compile_mode=config["compile"],
                                channels_last=config["channels_last"], process=process, notice=notice)
    if not config["compile"]:
        skip_dynamo()  # torch.optim's wrappers would import torch._dynamo for nothing: a second
    optimizer, groups = create_optimizer(model, config)
    batches = make_batches(config, train_data, process)
    epochs = epochs or config["train"]["epochs"]
    schedule = create_schedule(optimizer, config, optimizer_steps(config, batches), epochs)
    run = Run(config, parts.plan, model, parts.data, batches, val, parts.loss_fn.to(target_device), optimizer,
              groups, schedule, target_device, run_dir or Path(config["checkpoint"]["dir"]) / config["name"],
              epochs, step_model, grad_scaler(config["amp"], target_device), process,
              plain_config=to_plain(config.values))
    run.state.best["metric"] = run.monitor
    run.augment = parts.augment
    if (ema := config["train"]["ema"]) is not None:  # after wrap_model, which may move the weights
        run.ema = WeightAverage(model, ema["decay"], ema["warmup"])
    return run
