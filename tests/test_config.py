"""Config validation: every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsegdiff_core.config import load_config, parse_config
from medsegdiff_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(ROOT / "configs" / name)
    assert config.unet_spec().mask_channels == len(config.data.classes)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_use_the_measured_defaults(name: str) -> None:
    """The settings the README measured are config.py's own defaults, not only the files'."""
    config, defaults = load_config(ROOT / "configs" / name), parse_config({})
    for section, key in [
        ("diffusion", "prediction"),
        ("inference", "sampler"),
        ("inference", "sampling_steps"),
        ("inference", "eta"),
    ]:
        value = getattr(getattr(config, section), key)
        assert value == getattr(getattr(defaults, section), key), (section, key, value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"bach_size": 4}}, r"x\.yaml: train\.bach_size: unknown key"),
        ({"train": {"batch_size": "eight"}}, r"x\.yaml: train\.batch_size: .*integer"),
        ({"model": {"preset": "huge"}}, r"model\.preset: .*'tiny'"),
        ({"train": {"lr": -1}}, r"train\.lr: .*greater than 0"),
        (
            {"model": {"image_size": 30, "preset": "tiny"}},
            r"model\.image_size 30 must be divisible",
        ),
        ({"data": {"classes": {"cup": [0]}}}, r"data\.classes: .*1\.\.255"),
        ({"inference": {"sampler": "euler"}}, r"inference\.sampler"),
        ({"surprise": 1}, r"surprise: unknown key"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data, source="x.yaml")


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_yaml_tags_are_refused_by_name(tmp_path: Path) -> None:
    # safe_load never builds objects; a tag is refused as such, not as "not valid YAML"
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("name: x\nmodel: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ConfigError) as error:
        load_config(tagged)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{tagged}: YAML tags are not allowed")
    assert "!!python/object/apply:os.system at line 2" in message
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: {preset: tiny}\n")
    with pytest.raises(ConfigError, match=r"override train\.steps: YAML tags are not allowed"):
        load_config(plain, ["train.steps=!!python/object:os.system {}"])


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: tiny}\n")
    config = load_config(path, ["train.steps=7", "model.base_channels=8", "data.train=a/b"])
    assert config.train.steps == 7 and config.unet_spec().base_channels == 8
    assert config.data.train == [Path("a/b")]
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(path, ["train.steps=zero"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["train.steps"])
