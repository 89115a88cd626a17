import pytest

from edgellm_steps.errors import PrecisionError
from edgellm_steps.precision import Precision, check_sm_supports, parse_precision


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fp16", Precision("fp16")),
        ("fp8", Precision("fp8")),
        ("int4_awq-lmfp8", Precision("int4_awq", "fp8")),
        ("nvfp4-kvfp8", Precision("nvfp4", None, "fp8")),
        ("int8_sq-lmnvfp4-kvfp8", Precision("int8_sq", "nvfp4", "fp8")),
    ],
)
def test_grammar_round_trips(text, expected):
    assert parse_precision(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["", "FP16", "fp16-", "fp16-lm", "fp16-kvfp8-lmfp8", "int4", "fp16-lmint8", "fp16-kvint8"]
)
def test_bad_strings_quote_the_grammar(text):
    with pytest.raises(PrecisionError, match=r"<weights>\[-lm<lm_head>\]\[-kv<kv_cache>\]"):
        parse_precision(text)


def test_quantize_step_and_floors():
    assert not parse_precision("fp16").needs_quantize_step
    assert not parse_precision("int4_gptq").needs_quantize_step
    assert parse_precision("int4_gptq-kvfp8").needs_quantize_step
    assert parse_precision("int4_awq-lmnvfp4").sm_floor() == 100
    assert parse_precision("fp8").sm_floor() == 89


@pytest.mark.parametrize(
    ("precision", "sm"), [("fp8", 87), ("nvfp4", 90), ("int4_awq-lmnvfp4", 89), ("fp16-kvfp8", 86)]
)
def test_sm_floors_refuse(precision, sm):
    with pytest.raises(PrecisionError, match="needs SM >="):
        check_sm_supports(parse_precision(precision), sm)


@pytest.mark.parametrize(("precision", "sm"), [("fp16", 80), ("int4_awq", 87), ("fp8", 89), ("nvfp4-kvfp8", 110)])
def test_sm_floors_allow(precision, sm):
    check_sm_supports(parse_precision(precision), sm)
