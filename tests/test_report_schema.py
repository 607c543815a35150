"""`nncli schema`: a JSON Schema (2020-12) of the config format, from the validator's own tables and
the registries; the shipped configs pass it and point at it, broken ones that it can tell fail."""
from __future__ import annotations

import json

import pytest
import yaml
from helpers import BROKEN, CONFIGS, run_nncli, write_config

from nncli.config.schema import SOURCES, TOP, TRAIN
from nncli.model.layers import LAYERS

jsonschema = pytest.importorskip("jsonschema")

MODELINE = "# yaml-language-server: $schema=nncli.schema.json\n"
# Broken configs whose fault is in the file alone (a key, a type, a range, a name); the others
# need the model or the data (shapes, labels), or are not YAML that a schema sees.
SCHEMA_DETECTABLE = [
    "01_empty", "02_top_level_list", "03_missing_model", "04_unknown_top_key", "10_unknown_argument",
    "11_missing_argument", "12_wrong_type", "22_bad_repeat", "24_unknown_optimizer", "27_layers_empty",
    "28_train_epochs_zero", "29_unknown_train_key", "30_trainable_not_bool", "32_layer_not_a_name",
    "39_compile_mode_typo", "40_schedule_gamma_not_a_number", "44_optimizer_betas_too_short",
    "48_loader_misspelt", "49_loader_inside_a_source", "50_mmap_on_a_csv_source",
    "51_epochs_at_the_top_level", "52_loader_under_train", "53_device_under_train", "54_layer_name_as_key",
    "59_optimizer_lr_not_a_number", "61_milestones_not_a_list", "62_metric_is_a_list", "63_source_is_a_list",
    "64_schedule_type_is_a_mapping", "65_warmup_is_a_number", "67_seed_out_of_range", "71_lbfgs",
    "76_optimizer_type_is_a_list", "77_loss_type_is_a_list", "78_csv_delimiter_two_characters",
    "78_data_key_misspelt", "79_csv_delimiter_empty", "79_optimizer_letters_swapped", "80_csv_key_case_slip",
]


@pytest.fixture(scope="module")
def schema():
    """In a fresh process: the registries as they are without plugins (tests in this process
    may have loaded some)."""
    result = run_nncli("schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def validator(schema):
    jsonschema.Draft202012Validator.check_schema(schema)  # a valid 2020-12 schema itself
    return jsonschema.Draft202012Validator(schema)


def test_it_is_generated_from_the_validators_tables(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    top = schema["properties"]
    assert set(TOP) | {"base"} == set(top)
    assert top["train"]["properties"]["epochs"] == {"type": "integer", "default": TRAIN["epochs"].default,
                                                    "exclusiveMinimum": 0}
    assert top["amp"]["enum"] == ["off", "bf16", "fp16"]
    sources = [branch["properties"]["source"]["const"] for branch in top["data"]["anyOf"]
               if "source" in branch.get("properties", {})]
    assert sources == list(SOURCES)
    layer = schema["$defs"]["layer"]["anyOf"][0]["anyOf"][0]["enum"]
    assert layer == [name for name, entry in LAYERS.items() if entry.source != "plugin"]
    linear = next(branch["then"] for branch in schema["$defs"]["layer"]["anyOf"][1]["allOf"]
                  if branch["if"]["properties"]["type"]["const"] == "Linear")
    # out_features is required unless args: gives it; in_features is inferred from the input
    assert linear["anyOf"] == [{"required": ["args"]}, {"required": ["out_features"]}]
    bias = {"type": "boolean", "default": True, "description": "true or false"}
    assert linear["properties"]["bias"] == bias
    assert linear["additionalProperties"] is False


def test_the_committed_schema_is_the_generated_one(schema):
    committed = json.loads((CONFIGS / "nncli.schema.json").read_text())
    if committed["$comment"] != schema["$comment"]:  # CI's torch is the one it was written with
        pytest.skip(f"configs/nncli.schema.json is of another torch: {committed['$comment']}")
    assert committed == schema, "regenerate it: nncli schema --out configs/nncli.schema.json"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_and_names_the_schema(validator, path):
    text = path.read_text()
    assert text.startswith(MODELINE)
    errors = [error.message for error in validator.iter_errors(yaml.safe_load(text))]
    assert errors == []


@pytest.mark.parametrize("name", SCHEMA_DETECTABLE)
def test_broken_configs_fail(validator, name):
    assert not validator.is_valid(yaml.safe_load((BROKEN / f"{name}.yaml").read_text()))


def test_a_child_of_a_base_may_leave_the_model_to_it(validator):
    assert validator.is_valid({"base": "common.yaml", "train": {"epochs": 3}})
    assert not validator.is_valid({"base": "common.yaml", "train": {"epoch": 3}})


def test_plugin_layers_are_open_unless_named(tmp_path, validator):
    """A plugin's layer type passes unchecked; with --plugin, the schema has its arguments."""
    config = {"plugins": ["seed_linear.py"], "model": {"layers": [{"type": "SeedLinear", "out_feature": 2}]}}
    assert validator.is_valid(config)
    out = tmp_path / "schema.json"
    result = run_nncli("schema", "--plugin", CONFIGS / "plugins" / "seed_linear.py", "--out", out)
    assert result.returncode == 0 and result.stdout == f"wrote {out}\n", result.stderr
    with_plugin = jsonschema.Draft202012Validator(json.loads(out.read_text()))
    assert with_plugin.is_valid(config)
    config["model"]["layers"][0]["out_features"] = 2  # not the plugin's argument
    assert not with_plugin.is_valid(config) and validator.is_valid(config)


def test_a_config_written_for_the_tests_passes(validator, tmp_path):
    path = write_config(tmp_path, """
        data: {source: npz, path: d.npz, x: images, y: labels, normalize: true}
        optimizer: {type: SGD, lr: 0.1, groups: [{params: "*.bias", weight_decay: 0}]}
        schedule: {type: OneCycleLR, interval: step, warmup: {steps: 3}}
        model:
          layers:
            block: {type: Residual, layers: [{type: Conv2d, out_channels: 4, kernel_size: 3, padding: 1}]}
            flat: Flatten
    """)
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []
