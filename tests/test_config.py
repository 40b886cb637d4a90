import dataclasses
import io
import typing

import pytest
import torch
import yaml

from dcml.config import (
    SamplerConfig,
    TrainConfig,
    available_presets,
    load_config,
    parse_override,
    upgrade_saved_config,
    validate_against_data,
)
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
    # The loss section holds every setting of the loss it names.
    settings = load_config(preset).loss.settings  # and the preset is valid
    assert set(raw["loss"]["settings"]) == {item.name for item in dataclasses.fields(settings)}, preset


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
        ("evaluation.protocol=cross_vendor", "evaluation.protocol must be one of leave_one_out, query_gallery, vehicleid, "
                                             "cross_group; got 'cross_vendor'"),
        ("loss.alpha=0.3", "unknown setting loss.alpha; did you mean loss.settings.alpha?"),
        ("loss.beta_mode=class", "unknown setting loss.beta_mode; did you mean loss.settings.beta_mode?"),
        ("loss.triplet_margin=0.1", "unknown setting loss.triplet_margin; did you mean loss.settings.margin?"),
        ("loss.nmae=triplet", "unknown setting loss.nmae; did you mean loss.name?"),
        ("loss.name=tripet", "loss.name must be one of margin, pml, triplet; got 'tripet' (did you mean triplet?)"),
        ("loss.settings.alpah=0.3", "unknown setting loss.settings.alpah; did you mean loss.settings.alpha?"),
        ("loss.settings.alpha=-1", "loss.settings.alpha must be > 0; got -1.0"),
        ("loss.settings.beta_mode=global", "loss.settings.beta_mode must be one of learner, class, fixed; got 'global'"),
        ("loss.name=triplet;loss.settings.margin=0", "loss.settings.margin must be > 0; got 0.0"),
        ("loss.name=pml", "loss.name=pml needs loss.settings.loss_name, e.g. MultiSimilarityLoss"),
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


# ---------------------------------------------------------------------------- the loss section
def test_loss_settings_are_set_under_loss_settings_and_reach_the_loss():
    from dcml.training.preflight import create_configured_loss

    config = load_config("emoji", ["loss.settings.alpha=0.3", "loss.settings.beta_mode=class"])
    assert (config.loss.name, config.loss.settings.alpha, config.loss.settings.beta_mode) == ("margin", 0.3, "class")
    loss = create_configured_loss(config, num_classes=6)
    assert loss.alpha == 0.3 and loss.beta.shape == (6,)
    assert loss.miner.nonzero_loss_cutoff == pytest.approx(1.5)  # beta + alpha


def test_naming_another_loss_replaces_the_presets_loss_settings():
    config = load_config("emoji", ["loss.name=triplet"])
    assert config.loss.settings == type(config.loss.settings)()  # the triplet loss's defaults, not margin's
    assert load_config("emoji", ["loss.settings.margin=0.1", "loss.name=triplet"]).loss.settings.margin == 0.1
    pml = load_config("emoji", ["loss.name=pml", "loss.settings.loss_name=ContrastiveLoss",
                                "loss.settings.loss_kwargs={pos_margin: 0.0, neg_margin: 1.0}"]).loss.settings
    assert (pml.loss_name, pml.loss_kwargs, pml.miner_name) == ("ContrastiveLoss", {"pos_margin": 0.0, "neg_margin": 1.0}, None)
    # What the command line asks for is kept: a margin setting with another loss is an error, not dropped.
    with pytest.raises(UserError, match="unknown setting loss.settings.alpha"):
        load_config("emoji", ["loss.name=triplet", "loss.settings.alpha=0.3"])


def test_a_config_saved_before_loss_settings_existed_loads_with_its_own_settings():
    current = load_config("emoji", ["loss.settings.alpha=0.3", "loss.settings.beta_mode=fixed"])
    saved = current.to_dict()
    saved["loss"] = {"name": "margin", "alpha": 0.3, "beta": 1.2, "nu": 0.0, "beta_mode": "fixed", "triplet_margin": 0.2,
                     "pml_loss": None, "pml_miner": None, "pml_kwargs": {}, "pml_miner_kwargs": {}, "pml_per_learner": False}
    assert load_config(None, [], base=saved) == current
    saved["loss"].update(name="pml", pml_loss="ContrastiveLoss", pml_kwargs={"neg_margin": 0.8}, pml_per_learner=True)
    settings = load_config(None, [], base=saved).loss.settings
    assert (settings.loss_name, settings.loss_kwargs, settings.per_learner) == ("ContrastiveLoss", {"neg_margin": 0.8}, True)
    assert upgrade_saved_config(current.to_dict()) == current.to_dict()  # today's layout passes unchanged


# ---------------------------------------------------------------------------- frozen, plain when saved
def test_a_loaded_config_is_frozen_and_replace_makes_a_changed_copy():
    config = load_config("cub200")
    for section, name in ((config, "seed"), (config.sampler, "batches_per_epoch"), (config.loss.settings, "alpha")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, 3)
    changed = dataclasses.replace(config, sampler=dataclasses.replace(config.sampler, batches_per_epoch=3))
    assert (changed.sampler.batches_per_epoch, config.sampler.batches_per_epoch) == (3, None)
    assert config.evaluation.recall_ks == (1, 2, 4, 8)  # a list in YAML, a tuple here


def test_to_dict_is_plain_data_that_yaml_and_a_weights_only_load_read_back():
    config = load_config("cub200", ["loss.name=pml", "loss.settings.loss_name=ContrastiveLoss",
                                    "loss.settings.loss_kwargs={neg_margin: 0.8}"])
    saved = config.to_dict()

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(key, str) and plain(item) for key, item in value.items())
        if isinstance(value, list):
            return all(plain(item) for item in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain(saved) and saved["evaluation"]["recall_ks"] == [1, 2, 4, 8]
    assert yaml.safe_load(yaml.safe_dump(saved)) == saved
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    assert load_config(None, [], base=torch.load(buffer, weights_only=True)) == config


# ---------------------------------------------------------------------------- one home for each name and default
def test_the_protocols_evaluation_protocol_accepts_are_the_evaluations():
    from dcml.data.records import Protocol
    from dcml.evaluation.protocols import protocol_names

    assert set(protocol_names()) == {protocol.value for protocol in Protocol}
    for name in protocol_names():
        assert load_config("emoji", [f"evaluation.protocol={name}"]).evaluation.protocol == name


def test_the_sampler_takes_the_configurations_defaults_and_choices():
    import inspect

    from dcml import sampling

    defaults = inspect.signature(sampling.ClusterBatchSampler).parameters
    for name in ("epoch_length", "pass_unit", "fill_small_clusters", "batches_per_epoch"):
        assert defaults[name].default == getattr(SamplerConfig(), name), name
    hints = typing.get_type_hints(SamplerConfig)
    assert typing.get_args(hints["epoch_length"]) == sampling.EPOCH_LENGTHS
    assert typing.get_args(hints["pass_unit"]) == sampling.PASS_UNITS


def test_every_section_validates_its_own_fields():
    for section in dataclasses.fields(TrainConfig):
        kind = section.default_factory if section.default_factory is not dataclasses.MISSING else None
        if kind is not None:
            assert "validate" in vars(kind), f"{section.name} has no validate() beside its fields"
