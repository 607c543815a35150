"""`nncli export`: a trained model in a format that runs without nncli, checked after writing.

The model is the checkpoint's own `nn.Sequential` (torch.nn layers, nncli's blocks, the user's
plugins), in eval mode. Each format is an entry of FORMATS that says what it holds:

| format | file | normalization (`data.normalize`: inputs; `data.normalize_target`: outputs) |
|---|---|---|
| `torchscript` | `torch.jit.script` (else `.trace`), `torch.jit.load` runs it | folded in (modules) |
| `pt2` | `torch.export` program with a dynamic batch, `torch.export.load(f).module()` | folded in |
| `onnx` | ONNX (opset of torch's exporter), a dynamic batch, input `input`, output `output` | folded in |
| `safetensors` | the state_dict, `safetensors.torch.load_file` | beside it: `<file>.normalization.json` |
| `state_dict` | the state_dict, `torch.load(f, weights_only=True)` | beside it: `<file>.normalization.json` |

A state_dict's keys are the model's: it loads into the same network written by hand. After
writing, the file is loaded back the way its users would load it and run on a batch of inputs
(drawn from the seed, in the range the model was trained on: the training mean and std when the
run normalized); its outputs must be the checkpoint model's within TOLERANCE (times the
largest output, where that is above 1). The file is
written to a temporary name and renamed once it passed, so no unchecked file is left.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nncli.data.load import in_target_units
from nncli.data.samples import normalize
from nncli.errors import ConfigError, RunError, did_you_mean, first_line
from nncli.files import write_text_atomic
from nncli.model.plan import input_dtype, plan_model
from nncli.run.checkpoint import find_checkpoint, holds_checkpoint
from nncli.run.inference import Named, load_trained

# The largest difference allowed between the exported model's outputs and the checkpoint's, relative
# to the outputs' size where that is above 1: float32 rounding grows with it (logits of 20 differ by
# 2e-6 between two correct convolution kernels)
TOLERANCE = 1e-5
WEIGHTS_ALONE = ("--format state_dict (or safetensors) writes the weights alone, for the same network "
                 "built in Python, and works for any model.")


class Standardize(nn.Module):
    """(x - mean) / std with the training set's statistics: the run's `data.normalize`, folded
    into an exported model so that it takes raw inputs, as `nncli predict` does."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class InTargetUnits(nn.Module):
    """y * std + mean: the outputs of a model trained on standardized targets (the run's
    `data.normalize_target`) in the targets' own units, as `nncli predict` gives them."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


@dataclass(frozen=True)
class ExportFormat:
    """One format: its file suffix, the extra that installs what writes it (None: torch alone),
    whether the normalization is folded into the model (else written beside the file), how it is
    written, and how the written file is loaded and run (as its users would)."""

    suffix: str
    extra: str | None
    modules: tuple[str, ...]  # what the extra installs, imported to tell whether it is there
    folds_normalization: bool
    write: Callable[[nn.Module, torch.Tensor, Path], str]  # returns a note on how it was written
    run: Callable[[Path, nn.Module, torch.Tensor], torch.Tensor]  # (file, a fresh model, inputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch's exporters print progress and warnings of their own; an export says one line."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_torchscript(model: nn.Module, x: torch.Tensor, file: Path) -> str:
    try:
        program, how = torch.jit.script(model), "scripted"
    except Exception:  # a layer that TorchScript cannot compile: record the operations it runs
        program, how = torch.jit.trace(model, (x,), check_trace=False), "traced (a layer cannot be scripted)"
    torch.jit.save(program, str(file))
    return how


def _run_torchscript(file: Path, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(file), map_location="cpu")(x)


def _batch_dimension() -> tuple:
    return ({0: torch.export.Dim.DYNAMIC},)


def _write_pt2(model: nn.Module, x: torch.Tensor, file: Path) -> str:
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=_batch_dimension()), str(file))
    return "a dynamic batch dimension"


def _run_pt2(file: Path, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.export.load(str(file)).module()(x)


def _write_onnx(model: nn.Module, x: torch.Tensor, file: Path) -> str:
    torch.onnx.export(model, (x,), str(file), dynamic_shapes=_batch_dimension(), input_names=["input"],
                      output_names=["output"], external_data=False, verbose=False)
    return "input 'input', output 'output', a dynamic batch dimension"


def _run_onnx(file: Path, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def _write_safetensors(model: nn.Module, x: torch.Tensor, file: Path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return "the state_dict"


def _run_safetensors(file: Path, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(file)))
    return model.eval()(x)


def _write_state_dict(model: nn.Module, x: torch.Tensor, file: Path) -> str:
    torch.save(model.state_dict(), file)
    return "the state_dict"


def _run_state_dict(file: Path, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    return model.eval()(x)


FORMATS = {
    "torchscript": ExportFormat(".torchscript.pt", None, (), True, _write_torchscript, _run_torchscript),
    "pt2": ExportFormat(".pt2", None, (), True, _write_pt2, _run_pt2),
    "onnx": ExportFormat(".onnx", "onnx", ("onnx", "onnxruntime", "onnxscript"), True, _write_onnx,
                         _run_onnx),
    "safetensors": ExportFormat(".safetensors", "safetensors", ("safetensors",), False, _write_safetensors,
                                _run_safetensors),
    "state_dict": ExportFormat(".state_dict.pt", None, (), False, _write_state_dict, _run_state_dict),
}


@dataclass
class Exported:
    """What `export` wrote and how it checked it."""

    source: Path  # the checkpoint
    file: Path
    normalization: str  # "folded in", "none", or the file written beside
    note: str  # how it was written
    batch: int
    difference: float  # the largest |exported - checkpoint| output on the check batch
    limit: float  # what it had to stay within: TOLERANCE, times the largest output above 1


def require_format(name: str) -> ExportFormat:
    """The format's entry; exit 2 for an unknown one, or one whose extra is not installed."""
    if name not in FORMATS:
        raise ConfigError(f"unknown format '{name}'; expected one of: {', '.join(FORMATS)}", key="--format",
                          hint=did_you_mean(name, FORMATS))
    entry = FORMATS[name]
    for module in entry.modules:
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{name} export needs {module}, which is not installed", key="--format",
                              hint=f"Install the extra: pip install 'nncli[{entry.extra}]'.") from None
    return entry


def sample_inputs(model: nn.Module, input_shape: list[int], dtype: torch.dtype, batch: int,
                  normalization: dict | None, seed: int) -> torch.Tensor:
    """A batch of inputs for the check, from `seed`: token ids below the first Embedding's size,
    else normal values, at the training data's mean and std when the run normalized."""
    generator = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        embedding = next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))), None)
        high = embedding.num_embeddings if embedding is not None else 2
        return torch.randint(0, high, (batch, *input_shape), generator=generator, dtype=dtype)
    x = torch.randn(batch, *input_shape, generator=generator, dtype=torch.float64)
    if normalization is not None:
        x = x * normalization["std"].double() + normalization["mean"].double()
    return x.to(dtype)


def default_output(source: Path, entry: ExportFormat) -> Path:
    """Beside the checkpoint: runs/x/best.pt -> runs/x/best.onnx."""
    return source.with_name(source.stem + entry.suffix)


def export_checkpoint(path: Path, format: str, out: Path | None = None, *, batch_size: int = 8,
                      checkpoint: str = "best", named: Named = Named()) -> Exported:
    """Write the model of the checkpoint at `path` (a run directory: its best.pt, or last.pt with
    `checkpoint="last"`; or a checkpoint file) as `format`, then check the written file."""
    entry = require_format(format)
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"expected best or last, got {checkpoint!r}", key="--checkpoint")
    prefer = ("best.pt", "last.pt") if checkpoint == "best" else ("last.pt", "best.pt")
    source = find_checkpoint(path, prefer)
    ckpt, config, plan = load_trained(source, "cpu", named)
    file = Path(out) if out is not None else default_output(source, entry)
    if file.resolve() == source.resolve() or (file.is_file() and _is_checkpoint(file)):
        raise ConfigError("is a checkpoint; export writes a new file and never replaces one", file=str(file),
                          key="--out", hint=f"e.g. --out {default_output(source, entry).name}")
    if file.is_dir():
        raise ConfigError("is a folder; --out takes the file to write", file=str(file), key="--out")
    file.parent.mkdir(parents=True, exist_ok=True)
    model, normalization = plan.model.eval(), ckpt.get("normalization")
    x = sample_inputs(model, ckpt["input_shape"], input_dtype(config), batch_size, normalization,
                      config["seed"])
    targets = ckpt.get("target_normalization")
    exported = model
    if entry.folds_normalization and (normalization is not None or targets is not None):
        before = [Standardize(**normalization)] if normalization is not None else []
        after = [InTargetUnits(**targets)] if targets is not None else []
        exported = nn.Sequential(*before, model, *after).eval()
    with torch.no_grad():
        expected = in_target_units(model(normalize(x, normalization)), targets)
    tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")  # the suffix kept: torch.export wants .pt2
    try:
        with _quiet():
            try:
                note = entry.write(exported, x, tmp)
            except Exception as err:
                raise RunError(f"{format} export failed: {first_line(err)}", hint=WEIGHTS_ALONE) from None
            fresh = plan_model(config, ckpt["input_shape"], device="cpu").model.eval()  # as a user builds it
            with torch.no_grad():
                if entry.folds_normalization:
                    got = entry.run(tmp, fresh, x)
                else:
                    got = in_target_units(entry.run(tmp, fresh, normalize(x, normalization)), targets)
        difference = (got.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        limit = TOLERANCE * max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
        if not difference <= limit:
            raise RunError(f"the exported {format} model's outputs differ from the checkpoint's by up to "
                           f"{difference:.3g} on a batch of {batch_size} (more than {limit:.2g}); nothing "
                           "was written", hint=WEIGHTS_ALONE)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    beside = "none" if normalization is None and targets is None else "folded in"
    if (normalization is not None or targets is not None) and not entry.folds_normalization:
        stats = file.with_name(file.name + ".normalization.json")
        written = {}
        if normalization is not None:
            written.update(mean=normalization["mean"].tolist(), std=normalization["std"].tolist(),
                           use="x = (x - mean) / std, per feature, before the model")
        if targets is not None:
            written.update(target_mean=targets["mean"].tolist(), target_std=targets["std"].tolist(),
                           target_use="y = y * target_std + target_mean, after the model")
        write_text_atomic(json.dumps(written), stats)
        beside = str(stats)
    return Exported(source, file, beside, note, batch_size, difference, limit)


def _is_checkpoint(file: Path) -> bool:
    try:
        return holds_checkpoint(file)
    except ConfigError:
        return False
