"""`nncli summary`: every layer's output shape, parameters and cost, from the shape pass alone."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from nncli.model.plan import ModelPlan, describe_shape


def _shape_json(shape: Any) -> Any:
    if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):
        return [list(s) for s in shape]
    return list(shape)


def summarize(plan: ModelPlan, depth: int | None = None,
              groups: dict[str, str] | None = None) -> dict:
    """The summary as plain data: totals, and one row per layer down to `depth` (None: all).

    A block at the depth limit stands for everything inside it. `groups` maps parameter names to
    optimizer groups, shown per layer when the config has groups.
    """
    params = list(plan.model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    rows = []
    for layer in plan.walk():
        if depth is not None and layer.depth > depth:
            continue
        row = {"name": layer.path, "type": layer.type, "depth": layer.depth,
               "output_shape": _shape_json(layer.output_shape), "params": layer.params,
               "trainable_params": layer.trainable_params, "macs": layer.macs // plan.batch_size}
        if groups:
            row["group"] = ", ".join(sorted({g for name, g in groups.items()
                                             if name.startswith(layer.path + ".")}))
        rows.append(row)
    return {
        "input_shape": list(plan.input_shape),
        "output_shape": _shape_json(plan.output_shape)[1:] if plan.layers else list(plan.input_shape),
        "batch_size": plan.batch_size,
        "total_params": total,
        "trainable_params": trainable,
        "non_trainable_params": total - trainable,
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "activation_bytes": sum(layer.activation_bytes for layer in plan.walk() if layer.children is None),
        "macs": sum(layer.macs for layer in plan.layers) // plan.batch_size,
        "layers": rows,
    }


# What the MACs column counts (torch's FlopCounterMode, halved): tools that also count the
# element-wise work (torchinfo) give slightly larger totals.
MACS_COUNTED = ("multiply-adds of convolutions, linear layers and matrix products (attention's too); "
                "biases, normalization, activations and pooling are not counted")


def human_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_summary(summary: dict, console: Console, title: str = "") -> None:
    table = Table(title=title or None, title_justify="left")
    has_groups = any("group" in row for row in summary["layers"])
    for column, justify in (("Layer", "left"), ("Type", "left"), ("Output shape", "left"),
                            ("Params", "right"), ("Trainable", "right"), ("MACs", "right")):
        table.add_column(column, justify=justify)
    if has_groups:
        table.add_column("Group")
    for row in summary["layers"]:
        shape = row["output_shape"]
        shape_text = (describe_shape(tuple(map(tuple, shape))) if shape and isinstance(shape[0], list)
                      else str(shape))
        cells = ["  " * row["depth"] + row["name"].rsplit(".", 1)[-1], row["type"], shape_text,
                 f"{row['params']:,}", f"{row['trainable_params']:,}", human_count(row["macs"])]
        table.add_row(*cells, *([row.get("group", "")] if has_groups else []))
    console.print(table)
    batch = summary["batch_size"]
    per = "one sample" if batch == 1 else f"a batch of {batch}"
    console.print(f"Input shape: {summary['input_shape']}   Output shape: {summary['output_shape']}")
    console.print(f"Total params: {summary['total_params']:,}   Trainable: {summary['trainable_params']:,}"
                  f"   Non-trainable: {summary['non_trainable_params']:,}")
    console.print(f"Parameter memory: {human_bytes(summary['param_bytes'])}   Activation memory "
                  f"({per}, forward): {human_bytes(summary['activation_bytes'])}")
    console.print(f"MACs (one sample): {human_count(summary['macs'])} ({summary['macs']:,}): {MACS_COUNTED}")


def print_parameters(plan: ModelPlan, console: Console) -> None:
    """Every named parameter, as the tutorial's `named_parameters()` loop prints them."""
    table = Table("Parameter", "Shape", "Numel", "requires_grad")
    for name, param in plan.model.named_parameters():
        table.add_row(name, str(list(param.shape)), f"{param.numel():,}", str(param.requires_grad))
    console.print(table)
