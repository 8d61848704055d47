"""UnlearnConfig round trip, help, and its options table; invalid values are rows of tests/test_bad_inputs.py."""

from dataclasses import fields

import pytest

from unlearn_core import UnlearnConfig
from unlearn_core.errors import InputError
from unlearn_core.method.config import ADAPTERS, DTYPES, options
from unlearn_core.method.objectives import OBJECTIVES, EraseDiff
from unlearn_core.method.surgery import BALANCE_MODES, SURGERY_MODES
from unlearn_core.method.weighting import FORGET_SPACES, REMEMBER_WEIGHTS, WEIGHTINGS

OPTIONS = options()


def test_round_trip_and_help():
    config = UnlearnConfig(steps=7, target_modules=["attn.to_q"], lora_alpha=4)
    again = UnlearnConfig.from_dict(config.to_dict())
    assert again == config and again.target_modules == ("attn.to_q",)
    assert config.effective_alpha == 4.0 and UnlearnConfig().effective_alpha == 8.0
    assert all(UnlearnConfig.help().values()), "every field documents itself"


def test_every_field_has_one_row_of_the_options_table_with_its_default():
    defaults = UnlearnConfig()
    assert list(OPTIONS) == [f.name for f in fields(UnlearnConfig)]
    for name, option in OPTIONS.items():
        assert option.default == getattr(defaults, name), name
        assert option.help == UnlearnConfig.help()[name]
        option.check(option.default)  # a default is always valid
    # the choices are the method modules' own lists, not copies
    assert {name: OPTIONS[name].choices for name in ("method", "adapter", "weighting", "surgery", "forget_space",
                                                    "remember_weight", "balance", "erasediff_noise", "dtype")} == {
        "method": OBJECTIVES, "adapter": ADAPTERS, "weighting": WEIGHTINGS, "surgery": SURGERY_MODES,
        "forget_space": FORGET_SPACES, "remember_weight": REMEMBER_WEIGHTS, "balance": BALANCE_MODES,
        "erasediff_noise": EraseDiff.NOISES, "dtype": DTYPES}  # fmt: skip
    assert {n for n, o in OPTIONS.items() if o.optional} == {"lora_alpha", "target_modules", "grad_clip"}


def just_below(value: float) -> float:
    # a relative nudge, not math.nextafter: a subnormal next to 0 reads as 0 once a library has
    # switched the CPU to flush denormals (torch.set_flush_denormal), as some tests' imports do
    return float(value) - 1e-9 * max(1.0, abs(value))


def just_above(value: float) -> float:
    return float(value) + 1e-9 * max(1.0, abs(value))


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.kind in ("int", "float")])
def test_numbers_are_refused_exactly_outside_their_stated_bounds(name):
    option = OPTIONS[name]
    step_down = (lambda v: v - 1) if option.kind == "int" else just_below
    step_up = (lambda v: v + 1) if option.kind == "int" else just_above
    below = step_down(option.low)
    with pytest.raises(InputError, match=f"^{name}="):
        UnlearnConfig(**{name: below})
    if option.low_open:
        with pytest.raises(InputError, match=f"^{name}="):
            UnlearnConfig(**{name: option.low})
        UnlearnConfig(**{name: just_above(option.low)})
    else:
        assert getattr(UnlearnConfig(**{name: option.low}), name) == option.low
    if option.high is not None:
        assert getattr(UnlearnConfig(**{name: option.high}), name) == option.high
        with pytest.raises(InputError, match=f"^{name}="):
            UnlearnConfig(**{name: step_up(option.high)})
    if option.kind == "float":
        for value in (float("nan"), float("inf")):
            with pytest.raises(InputError, match=f"^{name}={value}"):
                UnlearnConfig(**{name: value})
    else:
        with pytest.raises(InputError, match="whole number"):
            UnlearnConfig(**{name: option.low + 0.5})


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.kind == "choice"])
def test_choices_accept_each_listed_value_and_name_them_when_refusing(name):
    option = OPTIONS[name]
    # a balance bounds g_f by the remember gradient, which the default base remember target starts at zero
    companion = {"remember_target": "data"} if name == "balance" else {}
    for value in option.choices:
        assert getattr(UnlearnConfig(**{name: value, **companion}), name) == value
    with pytest.raises(InputError) as caught:
        UnlearnConfig(**{name: "no_such_value"})
    assert str(caught.value) == f"{name}='no_such_value' is not one of: {', '.join(option.choices)}"


def test_refusals_say_what_to_give_instead():
    cases = {
        ("learning_rate", 0.0): "learning_rate=0.0 must lie in (0, 0.1]; LoRA unlearning uses about 1e-4 to 1e-2",
        ("gamma", 21.0): "gamma=21.0 must lie in [0, 20]; 1 to 4 is the useful range",
        ("grad_clip", -1.0): "grad_clip=-1.0 must be positive, or None to disable clipping",
        ("lora_alpha", 0.0): "lora_alpha=0.0 must be positive, or None for alpha = rank",
        ("erasediff_eta", -0.5): "erasediff_eta=-0.5 must be a finite number >= 0",
        ("steps", 0): "steps=0 must be a whole number in [1, 1000000]; zero steps would train nothing",
        ("gradient_checkpointing", "yes"): "gradient_checkpointing='yes' must be true or false",
        ("target_modules", ("qkv", "")): "target_modules=('qkv', '') must be module name suffixes (non-empty "
                                         "strings), or None for the default set",
    }  # fmt: skip
    for (name, value), message in cases.items():
        with pytest.raises(InputError) as caught:
            UnlearnConfig(**{name: value})
        assert str(caught.value) == message
    # None is what the optional fields take for "off / the default"
    config = UnlearnConfig(grad_clip=None, lora_alpha=None, target_modules=None)
    assert config.effective_alpha == config.lora_rank


# Cross-field rules: a setting the combination never reads is named with the field that makes it so.
@pytest.mark.parametrize(
    ("settings", "ignored", "because"),
    [
        ({"method": "siss", "weighting": "constant"}, "weighting", "method='siss'"),
        ({"method": "neggrad", "surgery": "none", "own_noise_spread": 0.5}, "surgery", "method='neggrad'"),
        ({"method": "neggrad", "repair_when_forgotten": False}, "repair_when_forgotten", "method='neggrad'"),
        ({"erasediff_eta": 0.1}, "erasediff_eta", "method='surrogate'"),
        ({"method": "erasediff", "siss_scale": 0.1}, "siss_scale", "method='erasediff'"),
        ({"adapter": "full", "lora_rank": 16}, "lora_rank", "adapter='full'"),
        ({"adapter": "full", "target_modules": ("qkv",)}, "target_modules", "adapter='full'"),
        ({"balance_ratio": 0.3}, "balance_ratio", "balance='none'"),
        ({"gamma": 3.0, "weighting": "constant"}, "gamma", "weighting='constant'"),
        ({"constant_lambda": 0.2}, "constant_lambda", "weighting='power'"),
        ({"forget_noise": "fresh", "own_noise_spread": 0.5}, "own_noise_spread", "forget_noise='fresh'"),
        ({"stop_when_forgotten": False, "check_every": 5}, "check_every", "stop_when_forgotten is off"),
        ({"stop_when_forgotten": False, "repair_when_forgotten": False}, "repair_when_forgotten", "stop_when_forgotten"),
        ({"raise_after": 5}, "raise_after", "rate_schedule='fixed'"),
    ],
)  # fmt: skip
def test_a_setting_the_combination_ignores_is_warned_about_naming_both_fields(settings, ignored, because, caplog):
    with caplog.at_level("WARNING", logger="unlearn_core.method.config"):
        config = UnlearnConfig(**settings)
    assert because in config.ignored()[ignored]
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{ignored}=")]
    assert len(warned) == 1 and because in warned[0], caplog.text


def test_settings_that_are_read_are_not_warned_about(caplog):
    read = [{}, {"method": "siss", "siss_scale": 0.1}, {"method": "erasediff", "erasediff_eta": 0.1},
            {"balance": "cap", "balance_ratio": 0.3, "remember_target": "data"}, {"weighting": "constant", "constant_lambda": 0.2},
            {"lora_rank": 16, "target_modules": ("qkv",)}, {"rate_schedule": "raise", "raise_after": 5}, {"gamma": 3.0}]  # fmt: skip
    with caplog.at_level("WARNING", logger="unlearn_core.method.config"):
        for settings in read:
            assert UnlearnConfig(**settings).ignored() == {}, settings
    assert "ignored" not in caplog.text
