"""UnlearnConfig round trip and help; invalid values are rows of tests/test_bad_inputs.py."""

from unlearn_core import UnlearnConfig


def test_round_trip_and_help():
    config = UnlearnConfig(steps=7, target_modules=["attn.to_q"], lora_alpha=4)
    again = UnlearnConfig.from_dict(config.to_dict())
    assert again == config and again.target_modules == ("attn.to_q",)
    assert config.effective_alpha == 4.0 and UnlearnConfig().effective_alpha == 8.0
    assert all(UnlearnConfig.help().values()), "every field documents itself"
