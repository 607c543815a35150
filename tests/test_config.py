"""Every broken config is refused by `nncli validate` and `nncli summary` with exit status 2 and one
paragraph on stderr naming the file, the line and what is wrong; no traceback unless --debug.

Each file in tests/broken/ starts with two comment lines:
    # expect: <a substring of the error message>
    # line: <the line the message must name, or `none` when the error has no line>
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from helpers import BROKEN, CONFIGS, write_config

CASES = sorted(BROKEN.glob("*.yaml"))


def _header(path: Path) -> tuple[str, int | None]:
    lines = path.read_text(encoding="utf-8").splitlines()
    expect = re.fullmatch(r"# expect: (.+)", lines[0])
    line = re.fullmatch(r"# line: (\d+|none)", lines[1])
    assert expect and line, f"{path.name}: the first two lines must be '# expect: ...' and '# line: N'"
    return expect.group(1), None if line.group(1) == "none" else int(line.group(1))


def test_corpus_is_large_enough():
    assert len(CASES) >= 22
    for path in CASES:
        _header(path)  # every file has a well-formed header


def _check_refused(result, path: Path, expect: str, line: int | None) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr
    assert "Traceback" not in err
    assert result.stdout == ""
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert where in err, f"expected {where!r} in {err!r}"
    assert expect in err, f"expected {expect!r} in {err!r}"
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1  # one paragraph, one line


@pytest.mark.parametrize("command", ["validate", "summary"])
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_broken_config_is_refused(cli, path, command):
    expect, line = _header(path)
    _check_refused(cli(command, path), path, expect, line)


def test_debug_shows_traceback(cli):
    path = BROKEN / next(p.name for p in CASES if "unknown_layer_Conv2D" in p.name)
    result = cli("validate", path, "--debug")
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr
    assert "Did you mean 'Conv2d'?" in result.stderr


def test_binary_file_is_refused(cli, tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00binary")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path}:1: " in result.stderr
    assert "not a text file" in result.stderr
    assert "Traceback" not in result.stderr


def test_nul_bytes_are_refused(cli, tmp_path):
    path = tmp_path / "nul.yaml"
    path.write_bytes(b"model:\n  input_shape: [4]\x00\n")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path}:2: " in result.stderr and "NUL" in result.stderr


def test_missing_file_is_refused(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "file not found" in result.stderr and "nope.yaml" in result.stderr


def test_directory_is_refused(cli, tmp_path):
    result = cli("summary", tmp_path)
    assert result.exit_code == 2
    assert "is a directory" in result.stderr


def test_recursive_alias_is_refused(cli, tmp_path):
    path = write_config(tmp_path, """
        a: &a [*a]
        model: {input_shape: [4], layers: [{type: Linear, out_features: 2}]}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr and f"{path}:1: " in result.stderr


def test_deep_nesting_is_refused(cli, tmp_path):
    path = write_config(tmp_path, "model: " + "[" * 5000 + "]" * 5000 + "\n")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "nested too deeply" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("override, expect", [
    ("optimiser.lr=0.1", ["--set", "unknown key 'optimiser' in 'optimiser.lr=0.1'",
                          "Did you mean 'optimizer'?"]),
    ("train.epoch=3", ["--set", "unknown key 'train.epoch' in 'train.epoch=3'", "Did you mean 'epochs'?"]),
    ("trian.epochs=3", ["--set", "Did you mean 'train'?"]),
    ("epochs=3", ["--set", "unknown key 'epochs' in 'epochs=3'", "Did you mean --set train.epochs=3?"]),
    ("train.lr=0.1", ["--set", "unknown key 'train.lr'", "Did you mean --set optimizer.lr=0.1?"]),
    ("model.layers.0.out_channels=-2", ["seed_positional.yaml:8: 0 (Conv2d): argument 'out_channels' is a "
                                        "size and must be positive, got -2. (--set changed "
                                        "model.layers.0.out_channels.)"]),
    ("train.epochs", ["is not KEY=VALUE"]),
    ("train.epochs=0", ["must be greater than 0, got 0"]),
])
def test_set_with_bad_key_is_refused(cli, override, expect):
    for command in ("validate", "summary"):
        result = cli(command, CONFIGS / "seed_positional.yaml", "--set", override)
        assert result.exit_code == 2, result.stderr
        for text in expect:
            assert text in result.stderr
        assert "Traceback" not in result.stderr


def test_set_into_an_unknown_layer_name_is_refused(cli):
    """A misspelt layer name in --set must not quietly add a layer to a mapping of layers."""
    result = cli("summary", CONFIGS / "digits_cnn.yaml", "--set",
                 "model.layers.featurs.layers.0.out_channels=8")
    assert result.exit_code == 2
    assert ("model.layers has no key 'featurs' (it has: features, head). Did you mean 'features'?"
            in result.stderr)


def test_optimizer_without_type_is_the_default_adam(cli):
    result = cli("validate", CONFIGS / "digits_mlp.yaml", "--set", "optimizer={lr: 0.01}")
    assert result.exit_code == 0, result.stderr
    result = cli("validate", CONFIGS / "digits_mlp.yaml", "--set", "optimizer={lr: 0.01, momentum: 0.9}")
    assert result.exit_code == 2 and "Adam has no argument 'momentum'" in result.stderr


def test_set_changes_the_model(cli):
    result = cli("validate", CONFIGS / "seed_ordered_dict.yaml", "--set", "model.input_shape=[3, 10, 10]")
    assert result.exit_code == 0, result.stderr
    assert "output [3, 8, 8]" in result.stdout


def test_error_line_points_inside_nested_block(cli, tmp_path):
    path = write_config(tmp_path, """
        model:
          input_shape: [8]
          layers:
            body:
              type: Sequential
              layers:
                - {type: Linear, out_features: 8}
                - {type: Linear, out_feature: 8}
    """)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path}:8: body.1 (Linear): Linear has no argument 'out_feature'" in result.stderr
    assert "Did you mean 'out_features'?" in result.stderr


@pytest.mark.parametrize("char", ["\x1b", "\ufffe", "\x07"], ids=["ESC", "U+FFFE", "BEL"])
def test_control_characters_are_refused_at_their_line(cli, tmp_path, char):
    """An ESC pasted with a terminal colour code, a noncharacter: exit 2 at the file's line, or
    naming the --set option (the loader used to fail outside its error handling)."""
    path = write_config(tmp_path, f"""
        model:
          input_shape: [4]
          layers: [{{type: Linear, out_features: 2, name: "head{char}[0m"}}]
    """)
    code = f"U+{ord(char):04X}"
    result = cli("validate", path)
    _check_refused(result, path, f"contains the character {code}, which YAML does not allow", 3)
    result = cli("validate", CONFIGS / "seed_positional.yaml", "--set", f"name=run{char}")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"error: --set name: contains the character {code}"), result.stderr
    assert "Traceback" not in result.stderr and "position" not in result.stderr


def test_a_large_document_without_aliases_loads(cli, tmp_path):
    """A 1 MB inline `tensors` section (325,000 values, no anchors) is data, not an alias bomb."""
    rows = [", ".join(str((r * 7 + c) % 10) for c in range(24)) for r in range(13_000)]
    path = write_config(tmp_path, f"""
        data:
          source: tensors
          x: [{"], [".join(rows).join("[]")}]
          y: [{", ".join(str(r % 2) for r in range(13_000))}]
        model:
          layers: [{{type: Linear, out_features: 2}}]
    """)
    assert path.stat().st_size > 1_000_000
    result = cli("validate", path)
    assert result.exit_code == 0, result.stderr
    assert "input [24] -> output [2]" in result.stdout



# --- base: inheritance and YAML merge keys -------------------------------------------------------

COMMON = """
    seed: 1
    data: {source: csv, path: ../data/points.csv, target: y, val_split: 0}
    loss: MSELoss
    optimizer: {type: SGD, lr: 0.1, momentum: 0.9}
    train: {epochs: 2, batch_size: 4}
    model:
      layers:
        - {type: Linear, out_features: 4}
        - {type: Linear, out_features: 1}
"""


def _family(tmp_path: Path, child: str, common: str = COMMON) -> Path:
    """tmp_path/bases/common.yaml (whose data path is relative to its own folder), tmp_path/data/points.csv,
    and the child config tmp_path/child.yaml."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "points.csv").write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(12)))
    write_config(tmp_path / "bases", common, "common.yaml")
    return write_config(tmp_path, child, "child.yaml")


def test_base_is_deep_merged_under_the_child(cli, tmp_path):
    """The child's values win, mappings merge key by key, lists are replaced whole, --set applies
    last; config.yaml is the resolved whole, without base:, its data path relative to the child's folder
    (the base wrote it relative to its own)."""
    import yaml

    child = _family(tmp_path, """
        base: bases/common.yaml
        optimizer: {lr: 0.01}
        train: {epochs: 3}
        model:
          layers: [{type: Linear, out_features: 1}]
    """)
    result = cli("train", child, "--out", tmp_path / "runs", "--set", "train.batch_size=6", "-q")
    assert result.exit_code == 0, result.stderr
    resolved = yaml.safe_load((tmp_path / "runs" / "child" / "config.yaml").read_text())
    assert "base" not in resolved
    assert resolved["optimizer"] == {"type": "SGD", "lr": 0.01, "momentum": 0.9}
    assert resolved["train"]["epochs"] == 3 and resolved["train"]["batch_size"] == 6 and resolved["seed"] == 1
    assert resolved["model"]["layers"] == [{"type": "Linear", "out_features": 1}]
    assert (tmp_path / resolved["data"]["path"]).resolve() == tmp_path / "data" / "points.csv"


def test_errors_name_the_line_of_the_file_that_wrote_the_value(cli, tmp_path):
    child = _family(tmp_path, """
        base: bases/common.yaml
        train: {epochs: 3, batchsize: 3}
    """)
    result = cli("validate", child)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {child}:2: train.batchsize: unknown key"), result.stderr
    assert "Did you mean 'batch_size'?" in result.stderr
    broken_base = COMMON.replace("out_features: 4}", "out_features: 4, bias: maybe}")
    shutil.rmtree(tmp_path / "data")
    child = _family(tmp_path, "base: bases/common.yaml\ntrain: {epochs: 3}\n", broken_base)
    result = cli("validate", child)
    assert result.exit_code == 2
    base = tmp_path / "bases" / "common.yaml"
    assert result.stderr.startswith(f"error: {base}:8: 0 (Linear): argument 'bias' expects true or false"), \
        result.stderr
    # a value of the base's section that the child overrides is blamed on the child's line
    write_config(tmp_path / "bases", COMMON, "common.yaml")
    (tmp_path / "child.yaml").write_text("base: bases/common.yaml\noptimizer: {lr: fast}\n")
    result = cli("validate", tmp_path / "child.yaml")
    assert result.exit_code == 2 and f"{tmp_path / 'child.yaml'}:2: optimizer.lr" in result.stderr


@pytest.mark.parametrize("base, expect, line", [
    ("bases/nowhere.yaml", "base file", 1),
    ("[bases/common.yaml, 3]", "expected a config file or a list of them", 1),
    ("child.yaml", "the bases form a circle (child.yaml -> child.yaml)", 1),
])
def test_bad_bases_are_refused_at_their_line(cli, tmp_path, base, expect, line):
    child = _family(tmp_path, f"base: {base}\ntrain: {{epochs: 3}}\n")
    _check_refused(cli("validate", child), child, expect, line)


def test_bases_chain_and_later_bases_win(cli, tmp_path):
    import yaml

    child = _family(tmp_path, """
        base: [bases/common.yaml, bases/fast.yaml]
        train: {epochs: 1}
    """)
    write_config(tmp_path / "bases", "base: common.yaml\noptimizer: {lr: 0.5}\ntrain: {batch_size: 12}\n",
                 "fast.yaml")
    result = cli("train", child, "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.stderr
    resolved = yaml.safe_load((tmp_path / "runs" / "child" / "config.yaml").read_text())
    assert resolved["optimizer"]["lr"] == 0.5 and resolved["train"]["batch_size"] == 12
    assert resolved["train"]["epochs"] == 1


def test_yaml_merge_keys_copy_an_anchor_and_own_keys_win(cli, tmp_path):
    import json

    layers = """
        model:
          input_shape: [1, 8, 8]
          layers:
            - &conv {type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}
            - {<<: *conv, out_channels: 6}
            - {<<: *conv, %s}
    """
    path = write_config(tmp_path, layers % "kernel_size: 5, padding: 2")
    result = cli("summary", path, "--json")
    assert result.exit_code == 0, result.stderr
    shapes = [layer["output_shape"] for layer in json.loads(result.stdout)["layers"]]
    assert shapes == [[1, 4, 8, 8], [1, 6, 8, 8], [1, 4, 8, 8]]
    path = write_config(tmp_path, layers % "kernal_size: 5")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert f"{path}:6: 2 (Conv2d): Conv2d has no argument 'kernal_size'" in result.stderr  # its own line
    path = write_config(tmp_path, layers % "out_channels: 5, out_channels: 7")
    result = cli("validate", path)  # a mapping's own keys still may not repeat
    assert result.exit_code == 2 and f"{path}:6: key 'out_channels' is given twice" in result.stderr
