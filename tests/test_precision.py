import pytest

from edgellm_steps.errors import PrecisionError
from edgellm_steps.quant.precision import Precision, check_sm_supports, parse_precision


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
    ("text", "error"),
    [
        # An empty part is malformed, not an unknown format '': without the expected error these two
        # cases could not fail, since the table of formats refuses '' as well as the pattern does.
        ("", "malformed precision ''"),
        ("fp16-lm", "malformed precision 'fp16-lm'"),
        ("FP16", "malformed precision 'FP16'"),
        ("fp16-", "malformed precision 'fp16-'"),
        ("fp16-kvfp8-lmfp8", "malformed precision 'fp16-kvfp8-lmfp8'"),
        ("int4", "unknown weight precision 'int4' in 'int4'"),
        ("fp16-lmint8", "unknown lm_head precision 'int8' in 'fp16-lmint8'"),
        ("fp16-kvint8", "unknown kv_cache precision 'int8' in 'fp16-kvint8'"),
    ],
)
def test_bad_strings_quote_the_grammar(text, error):
    with pytest.raises(PrecisionError, match=r"<weights>\[-lm<lm_head>\]\[-kv<kv_cache>\]") as raised:
        parse_precision(text)
    assert str(raised.value).startswith(f"{error}: expected <weights>"), str(raised.value)


def test_quantize_step_and_floors():
    assert not parse_precision("fp16").needs_quantize_step
    assert not parse_precision("int4_gptq").needs_quantize_step
    assert parse_precision("int4_gptq-kvfp8").needs_quantize_step
    check_sm_supports(parse_precision("int4_awq-lmnvfp4"), 100)
    check_sm_supports(parse_precision("fp8"), 89)


@pytest.mark.parametrize(
    ("precision", "sm"), [("fp8", 87), ("nvfp4", 90), ("int4_awq-lmnvfp4", 89), ("fp16-kvfp8", 86)]
)
def test_sm_floors_refuse(precision, sm):
    with pytest.raises(PrecisionError, match="needs SM >="):
        check_sm_supports(parse_precision(precision), sm)


@pytest.mark.parametrize(("precision", "sm"), [("fp16", 80), ("int4_awq", 87), ("fp8", 89), ("nvfp4-kvfp8", 110)])
def test_sm_floors_allow(precision, sm):
    check_sm_supports(parse_precision(precision), sm)
