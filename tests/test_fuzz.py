"""Random damage never gives a traceback: mangled recipe files end as a RecipeFileError (exit 2 with "Error:"),
mangled dataset lines as samples with an error, mangled safetensors headers and configs as a CheckpointError,
a LineageError or an EstimateError (a per-recipe error). In-process for speed; the CLI for a few fixed cases."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.checkpoint import CheckpointError, SafetensorsHeader, safetensors_header
from contract.dataset import DatasetError, Sample, iter_samples
from orchestrator.gpu.memory import EstimateError, read_workload
from orchestrator.planning.lineage import LineageError
from orchestrator.planning.plan import BoxFormatError, make_plans
from orchestrator.planning.recipes import RecipeFile, RecipeFileError, load_recipe_file

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD_RECIPES = """\
[defaults]
dataset = "data.jsonl"
max_new_tokens = 16
batch_size = "auto"
prompt = "{prompt} Answer with its bounding box."

[lineage]
remap = { "/ssd1/team" = "models" }
max_depth = 4

[[recipe]]
name = "base"
model = "model"
baseline = true

[[recipe]]
name = "tuned"
model = "model"
limit = 5
max_sample_errors = 0.1
dtype = "bfloat16"
"""
FIELDS = ["dataset", "max_new_tokens", "batch_size", "prompt", "name", "model", "baseline", "limit", "dtype",
          "max_sample_errors", "base", "attn", "box_format", "timeout", "retries", "memory_margin", "remap",
          "trust_remote_code", "unknown_field"]

# TOML values of every kind, rendered as TOML text (strings and keys are JSON-quoted, which TOML reads alike)
_scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                     st.booleans(), st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                       max_leaves=6)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, float):
        return repr(value) if "e" in repr(value) or "." in repr(value) else f"{value}.0"
    return json.dumps(value) if isinstance(value, str) else str(value)


@pytest.fixture(scope="module")
def recipe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-recipes")
    (folder / "data.jsonl").write_text("")
    (folder / "model").mkdir()
    (folder / "models").mkdir()
    return folder


def _load_never_crashes(path: Path) -> list[str]:
    """The file's problems ([] when it loads): a RecipeFileError whose every problem is one non-empty line, and
    nothing else."""
    try:
        assert isinstance(load_recipe_file(path), RecipeFile)
    except RecipeFileError as exc:
        assert exc.problems and str(exc).startswith(f"{path}: {len(exc.problems)} problem(s):")
        for problem in exc.problems:
            assert problem.strip() and "\n" not in problem, problem
        return exc.problems
    return []


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["delete", "insert", "replace"]), st.floats(0, 1),
                                st.text(alphabet=st.characters(codec="utf-8"), max_size=4)), min_size=1, max_size=4))
def test_mangled_recipe_text_is_a_recipe_file_error(recipe_folder: Path, edits: list) -> None:
    text = GOOD_RECIPES
    for action, where, chunk in edits:
        at = int(where * len(text))
        if action == "delete":
            text = text[:at] + text[at + max(1, len(chunk)):]
        elif action == "insert":
            text = text[:at] + chunk + text[at:]
        else:
            text = text[:at] + chunk + text[at + len(chunk):]
    path = recipe_folder / "mangled.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_never_crashes(path)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(["defaults", "lineage", "base", "tuned"]),
                                  st.sampled_from(FIELDS), _values), min_size=1, max_size=4))
def test_any_value_in_any_field_is_a_recipe_file_error_naming_the_field(recipe_folder: Path, changes: list) -> None:
    """Each field set to a random TOML value: the file loads, or every problem names where and which field."""
    tables: dict[str, dict[str, object]] = {"defaults": {}, "lineage": {}, "base": {}, "tuned": {}}
    for table, field, value in changes:
        tables[table][field] = value
    path = recipe_folder / "values.toml"
    path.write_text(_with_values(tables))
    for problem in _load_never_crashes(path):
        assert problem.startswith(("[defaults], field '", "[lineage], field '", "recipe '", "field 'baseline'",
                                   "not valid TOML")), problem


def _with_values(tables: dict[str, dict[str, object]]) -> str:
    """GOOD_RECIPES with `tables`' fields set (replacing a field of the same name)."""
    parts = {"defaults": {"dataset": '"data.jsonl"', "max_new_tokens": "16"},
             "lineage": {"remap": '{ "/ssd1/team" = "models" }'},
             "base": {"name": '"base"', "model": '"model"', "baseline": "true"},
             "tuned": {"name": '"tuned"', "model": '"model"', "limit": "5"}}
    for table, fields in tables.items():
        parts[table].update({field: _toml(value) for field, value in fields.items()})
    text = ""
    for table, fields in parts.items():
        text += "[[recipe]]\n" if table in ("base", "tuned") else f"[{table}]\n"
        text += "".join(f"{field} = {value}\n" for field, value in fields.items())
    return text


@pytest.mark.parametrize("text", [
    b'[[recipe]]\nname = "a"\nmodel = 5\nbatch_size = "big"\n',
    b"\xff\xfe[[recipe]]\x00",
    b'[defaults]\nprompt = "{prompt.upper}"\n[[recipe]]\nname = ["a"]\n[[recipe]]\n',
    b"[recipe]\nname = 'a'\n",
])
def test_plan_on_a_mangled_recipe_file_exits_2_with_an_error(recipe_folder: Path, text: bytes) -> None:
    path = recipe_folder / "cli.toml"
    path.write_bytes(text)
    result = run_cli("plan", str(path), "--device", "cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- dataset lines

_keys = st.sampled_from(["id", "image", "bbox", "prompt", "other"])
_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                            lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                    st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                            max_leaves=8)
_bboxes = st.one_of(  # four numbers (NaN, infinite, too large for a float among them), or anything near it
    st.lists(st.one_of(st.integers(), st.integers(2**1023, 2**1100), st.floats()), min_size=4, max_size=4),
    st.lists(st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=2)), min_size=3, max_size=5))
_line_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85"
                                            "\u2028\u2029"), max_size=40)
_lines = st.one_of(
    st.dictionaries(_keys, st.one_of(_json_values, _bboxes), max_size=5).map(json.dumps),
    st.builds(lambda i, b: json.dumps({"id": i, "image": "a.png", "bbox": b, "prompt": "p"}), st.text(max_size=5),
              _bboxes),
    _json_values.map(json.dumps),
    _line_text,
)


@FUZZ
@given(lines=st.lists(_lines, min_size=1, max_size=8))
def test_every_dataset_line_is_a_sample_or_a_sample_error(tmp_path_factory: pytest.TempPathFactory,
                                                          lines: list[str]) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-dataset.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        samples = list(iter_samples(path))
    except DatasetError as exc:  # two lines of one id: the whole set is refused, naming both
        assert str(path) in str(exc) and "ids must be unique" in str(exc) and " and again at line " in str(exc)
        return
    assert len(samples) == sum(1 for line in lines if line.strip())
    assert len({sample.id for sample in samples}) == len(samples)
    for sample in samples:
        assert isinstance(sample, Sample) and isinstance(sample.id, str | int) and not isinstance(sample.id, bool)
        if sample.error is None:  # usable: an image path and four finite numbers
            assert isinstance(sample.image_path, Path)
            assert len(sample.bbox) == 4 and all(isinstance(v, float) and abs(v) < float("inf") for v in sample.bbox)


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_read_as_a_dataset_give_samples(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.jsonl"
    path.write_bytes(data)
    try:
        assert all(isinstance(s, Sample) for s in iter_samples(path))
    except DatasetError as exc:  # bytes that open as another format (b"PAR1...": parquet) and fail as it: named
        assert str(path) in str(exc)


# ----------------------------------------------------------------------------- safetensors headers

def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


GOOD_HEADER = {"__metadata__": {"format": "pt"},
               "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
               "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]}}
GOOD_FILE = _safetensors(GOOD_HEADER, bytes(range(40)))


def _checked(path: Path) -> SafetensorsHeader | None:
    """The header, every tensor inside the file, or None for a CheckpointError naming the file; nothing else."""
    try:
        header = safetensors_header(path)
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: ")
        return None
    size = path.stat().st_size
    for info in header.tensors.values():
        begin, end = info["data_offsets"]
        assert 0 <= begin <= end <= size - header.data_start
    return header


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(GOOD_FILE) - 1), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(GOOD_FILE))))
def test_flipped_or_cut_safetensors_bytes_are_a_checkpoint_error_or_a_sound_header(
        tmp_path_factory: pytest.TempPathFactory, flips: list, cut: int | None) -> None:
    data = bytearray(GOOD_FILE)
    for at, value in flips:
        data[at] = value
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(bytes(data[:cut]))
    _checked(path)


@FUZZ
@given(data=st.binary(max_size=200))
def test_any_bytes_are_a_checkpoint_error_or_a_sound_header(tmp_path_factory: pytest.TempPathFactory,
                                                            data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-bytes.safetensors"
    path.write_bytes(data)
    _checked(path)


@FUZZ
@given(tensor=st.sampled_from(["a", "b", "c", "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", "other"]), value=_json_values,
       length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_mangled_header_entries_are_a_checkpoint_error_or_a_sound_header(
        tmp_path_factory: pytest.TempPathFactory, tensor: str, field: str, value: object, length: int | None) -> None:
    header = json.loads(json.dumps(GOOD_HEADER))
    header[tensor][field] = value
    data = _safetensors(header, bytes(40))
    if length is not None:
        data = struct.pack("<Q", length) + data[8:]
    path = tmp_path_factory.getbasetemp() / "fuzz-entry.safetensors"
    path.write_bytes(data)
    found = _checked(path)
    if found is not None and tensor != "__metadata__" and field != "other":
        assert found.tensors[tensor][field] == value  # a changed entry that passes is still a sound one


# ----------------------------------------------------------------------------- configs of a real chain

@pytest.fixture(scope="module")
def chain_copy(demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Copies of the demo's base and of an adapter on it (recorded relatively), and a recipe file naming both."""
    folder = tmp_path_factory.mktemp("fuzz-chain")
    shutil.copytree(demo["root"] / "models" / "base", folder / "base")
    shutil.copytree(demo["root"] / "models" / "r1-llm-only", folder / "adapter")
    files = {name: json.loads((folder / path).read_text()) for name, path in
             [("config", "base/config.json"), ("adapter", "adapter/adapter_config.json"),
              ("processor", "base/processor_config.json")]}
    files["adapter"]["base_model_name_or_path"] = "../base"
    (folder / "recipes.toml").write_text(f'[defaults]\ndataset = "{demo["dataset"]}"\n'
                                         '[[recipe]]\nname = "full"\nmodel = "base"\n'
                                         '[[recipe]]\nname = "adapter"\nmodel = "adapter"\n')
    return {"folder": folder, "files": files}


_CONFIG_KEYS = {
    "config": ["model_type", "architectures", "text_config", "vision_config", "tie_word_embeddings",
               "text_config.num_hidden_layers", "text_config.hidden_size", "text_config.num_attention_heads",
               "text_config.num_key_value_heads", "text_config.head_dim", "vision_config.embed_dim",
               "vision_config.patch_size", "vision_config.mlp_ratio", "vision_config.spatial_merge_size"],
    "adapter": ["base_model_name_or_path", "auto_mapping", "base_model_class", "target_modules", "r"],
    "processor": ["image_processor", "image_processor.size", "image_processor.min_pixels",
                  "image_processor.patch_size", "image_processor.merge_size", "size"],
}
_PATHS = {"config": "base/config.json", "adapter": "adapter/adapter_config.json",
          "processor": "base/processor_config.json"}


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(list(_CONFIG_KEYS)), st.integers(0, 100), _json_values),
                        min_size=1, max_size=3))
def test_mangled_config_values_are_a_per_recipe_error(chain_copy: dict, changes: list) -> None:
    """Any value in the config fields the parent reads: the plan and the memory estimate end in a LineageError or
    an EstimateError (a per-recipe error), or succeed; never another exception."""
    folder = chain_copy["folder"]
    files = json.loads(json.dumps(chain_copy["files"]))
    for which, pick, value in changes:
        keys = _CONFIG_KEYS[which]
        section, _, key = keys[pick % len(keys)].rpartition(".")
        target = files[which]
        if section:
            target = target.setdefault(section, {}) if isinstance(target.get(section), dict) else target
        target[key] = value
    for which, data in files.items():
        (folder / _PATHS[which]).write_text(json.dumps(data))
    recipe_file = load_recipe_file(folder / "recipes.toml")
    try:
        plans = make_plans(recipe_file, recipe_file.recipes)  # LineageError becomes the plan's problem
    except BoxFormatError as exc:  # a well-formed model_type of no known family: the run's config error (#14)
        assert "has no single native box convention" in str(exc) and "Set box_format to one of" in str(exc)
        return
    for plan in plans:
        if plan.runnable:
            try:
                read_workload(plan.recipe, plan.chain, "cuda")
            except EstimateError as exc:
                assert str(folder) in str(exc) or "dataset" in str(exc)
        else:
            assert plan.problem.startswith(("lineage: ", "config: "))  # config: auto cannot tell the family


def test_the_config_fuzz_reaches_both_outcomes(chain_copy: dict) -> None:
    """The fuzzed fields matter: a bad one fails the recipe, the untouched copy plans and estimates."""
    folder = chain_copy["folder"]
    for which, data in chain_copy["files"].items():
        (folder / _PATHS[which]).write_text(json.dumps(data))
    recipe_file = load_recipe_file(folder / "recipes.toml")
    plans = make_plans(recipe_file, recipe_file.recipes)
    assert all(p.runnable for p in plans)
    read_workload(plans[1].recipe, plans[1].chain, "cuda")
    bad = {**chain_copy["files"]["config"], "architectures": 7}
    (folder / _PATHS["config"]).write_text(json.dumps(bad))
    with pytest.raises(LineageError, match="architectures is 7"):
        from orchestrator.planning.lineage import resolve_chain

        resolve_chain(recipe_file.recipes[1], recipe_file.lineage)
