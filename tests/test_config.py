import pytest

from dcml.config import TrainConfig, available_presets, load_config, parse_override, validate_against_data
from dcml.errors import UserError


def test_bundled_presets():
    assert {"emoji", "cub200", "cars196", "sop", "inshop", "vehicleid", "cub200-tpami", "cars196-tpami", "sop-tpami",
            "inshop-tpami", "vehicleid-tpami"} <= set(available_presets())


@pytest.mark.parametrize("preset", available_presets())
def test_preset_sets_every_field_explicitly(preset):
    import yaml

    from dcml.config import preset_path

    raw = yaml.safe_load(preset_path(preset).read_text())
    defaults = TrainConfig().to_dict()
    assert set(raw) == set(defaults), preset
    for section, fields in defaults.items():
        if isinstance(fields, dict):
            assert set(raw[section]) == set(fields), f"{preset}: {section}"
    load_config(preset)  # and it is valid


def test_overrides_are_parsed_as_yaml_and_nest():
    assert parse_override("clustering.learners=8") == {"clustering": {"learners": 8}}
    assert parse_override("schedule.finetune_epoch=null") == {"schedule": {"finetune_epoch": None}}
    config = load_config("emoji", ["clustering.unit=class", "optimizer.lr_backbone=1e-3", "seed=3"])
    assert config.clustering.unit == "class" and config.optimizer.lr_backbone == 1e-3 and config.seed == 3


@pytest.mark.parametrize(
    "override, words",
    [
        ("clustering.learnrs=4", "did you mean clustering.learners"),
        ("clustering.unit=pixel", "clustering.unit must be one of image, class"),
        ("clustering.learners=3", "must divide model.embedding_dim=128"),
        ("clustering.learners=two", "clustering.learners must be an integer"),
        ("sampler.images_per_class=1", "sampler.images_per_class must be in 2..64"),
        ("sampler.classes_per_batch=1000;sampler.images_per_class=5", "above 4096"),
        ("schedule.conquer_epoch=500", "schedule.conquer_epoch=500 does not fit schedule.epochs=20"),
        ("data.train_augmentation=crop_flip", "cache_frozen_features needs data.train_augmentation=none"),
        ("clustering.hierarchical=yes please", "must be true or false"),
        ("evaluation.selection_metric=recall", "selection_metric must look like"),
        ("nonsense", "--set expects section.field=value"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(override, words):
    with pytest.raises(UserError) as error:
        load_config("emoji", override.split(";"))
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_hierarchical_needs_a_power_of_two():
    with pytest.raises(UserError, match="power-of-two"):
        load_config("emoji", ["clustering.hierarchical=true", "clustering.learners=8", "model.learner_head=masks",
                              "clustering.learners=6"])


def test_dataset_dependent_checks():
    config = load_config("emoji", ["clustering.learners=64"])
    with pytest.raises(UserError, match="too many for 100 training classes"):
        validate_against_data(config, 100, 18)
    with pytest.raises(UserError, match="has 18 blocks"):
        validate_against_data(load_config("emoji", ["model.trainable_blocks=30"]), 1000, 18)
    validate_against_data(load_config("emoji"), 764, 18)


def test_unknown_preset_lists_the_bundled_ones():
    with pytest.raises(UserError, match="choose one of: .*emoji"):
        load_config("no_such_preset")
