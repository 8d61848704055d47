import pytest

from unlearn_core import InputError, UnlearnConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, "zero steps"),
        ("steps", 2.5, "whole number"),
        ("learning_rate", 5.0, "outside"),
        ("learning_rate", float("nan"), "outside"),
        ("learning_rate", 0.0, "outside"),
        ("lora_rank", 0, "lora_rank"),
        ("forget_batch_size", 0, "forget_batch_size"),
        ("gamma", -1.0, "gamma"),
        ("surgery", "pcgrad", "project_forget"),
        ("method", "esd", "surrogate"),
        ("weighting", "cosine", "power"),
        ("dtype", "float8", "bfloat16"),
        ("adapter", "dora", "lora"),
        ("grad_clip", 0.0, "grad_clip"),
        ("lora_alpha", -2.0, "lora_alpha"),
        ("target_modules", (), "target_modules"),
        ("constant_lambda", 2.0, "constant_lambda"),
    ],
)
def test_invalid_values_name_the_field_and_the_fix(field, value, message):
    with pytest.raises(InputError, match=message):
        UnlearnConfig(**{field: value})


def test_round_trip_and_help():
    config = UnlearnConfig(steps=7, target_modules=["attn.to_q"], lora_alpha=4)
    again = UnlearnConfig.from_dict(config.to_dict())
    assert again == config and again.target_modules == ("attn.to_q",)
    assert config.effective_alpha == 4.0 and UnlearnConfig().effective_alpha == 8.0
    assert all(UnlearnConfig.help().values()), "every field documents itself"
    with pytest.raises(InputError, match="unknown config keys: stpes"):
        UnlearnConfig.from_dict({"stpes": 3})
