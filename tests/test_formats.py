"""The format table (quant/formats.py): every row complete, and everything that lists formats agrees with it."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import onnx
import pytest

from edgellm_steps.export.export_visual import VISUAL_PRECISIONS
from edgellm_steps.export.quantized_linear import EMITTERS, HELD_EMITTERS
from edgellm_steps.graph import opsets
from edgellm_steps.quant.formats import FORMATS, Format, formats_for
from edgellm_steps.quant.precision import KNOWN_SM_TARGETS, Precision, parse_precision
from edgellm_steps.verify.parity import TOLERANCES, tolerance_for
from edgellm_steps.workflow.config import load_schema
from edgellm_steps.workflow.targets import WILDCARDS

PACKAGE = Path(__file__).resolve().parent.parent / "edgellm_steps"


def every_precision() -> list[str]:
    """Every string the grammar admits, from the table."""
    lm = [None, *formats_for("lm_head")]
    kv = [None, *formats_for("kv_cache")]
    return [str(Precision(w, h, k)) for w, h, k in itertools.product(formats_for("weights"), lm, kv)]


def test_every_row_gives_every_column():
    assert all(
        field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        for field in dataclasses.fields(Format)
    )
    row = dataclasses.asdict(FORMATS["fp8"])
    del row["tolerance"]
    with pytest.raises(TypeError, match="tolerance"):  # negative control: a row missing a column
        Format(**row)


def test_rows_are_consistent():
    for name, row in FORMATS.items():
        assert row.name == name and row.roles
        assert row.sm_floor == 0 or row.sm_floor in KNOWN_SM_TARGETS, name
        assert row.onnx_opset in (opsets.OPSET, opsets.FP4_OPSET), name
        assert row.onnx_emitter is None or row.onnx_emitter in (HELD_EMITTERS if row.made == "held" else EMITTERS)
        assert (row.made == "held") == (row.quant_method is not None) == (row.quantize_instead is not None), name
        assert (row.made == "quantize") == (row.modelopt_recipe is not None) == (row.hf_quant_algo is not None), name
        assert (row.quantize_peak is None) == (row.made == "held"), name
        assert ("lm_head" in row.roles) == (row.lm_head_quantizer is not None), name
        assert ("kv_cache" in row.roles) == (row.kv_onnx_dtype is not None), name
        if row.kv_onnx_dtype is not None:
            assert isinstance(getattr(onnx.TensorProto, row.kv_onnx_dtype), int)
        assert TOLERANCES[name] is row.tolerance
        if row.quantize_instead is not None:
            assert FORMATS[row.quantize_instead].made == "quantize", name


def test_modelopt_has_every_recipe():
    import modelopt.torch.quantization as mtq

    for row in FORMATS.values():
        if row.modelopt_recipe is not None:
            assert isinstance(getattr(mtq, row.modelopt_recipe), dict), row.name


def test_a_held_format_has_its_own_tolerance_row():
    """No format falls back silently: each graph's criterion is one of the table's rows."""
    for precision in every_precision():
        parsed = parse_precision(precision)
        assert tolerance_for(parsed.formats()) in [TOLERANCES[f] for f in parsed.formats()]
    with pytest.raises(KeyError):  # negative control: an unknown format has no criterion
        tolerance_for(("int3",))


def test_the_config_schema_and_wildcards_agree_with_the_table():
    schema = load_schema()
    assert schema["$defs"]["sm"]["enum"] == list(KNOWN_SM_TARGETS)
    pattern = re.compile(schema["$defs"]["precision"]["pattern"])
    wildcard = re.compile(rf"^{WILDCARDS['precision']}$")
    for precision in every_precision():
        assert parse_precision(precision) and pattern.match(precision) and wildcard.match(precision), precision
    for malformed in ("fp8-lm", "fp8-kv", "-lmfp8", "fp8-kvfp8-lmfp8"):  # negative controls
        assert not pattern.match(malformed), malformed
    visual = schema["$defs"]["settings"]["properties"]["visual_precision"]["enum"]
    assert tuple(visual) == VISUAL_PRECISIONS and all(name in FORMATS for name in visual)


def test_at_most_one_literal_of_a_held_format_outside_the_table():
    """A format's facts live in its row: code names it through the table, not by its spelling."""
    for name, row in FORMATS.items():
        if row.made != "held":
            continue
        places = [
            str(path.relative_to(PACKAGE.parent))
            for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "rules").glob("*.smk")]
            if path.name != "formats.py" and f'"{name}"' in path.read_text()
        ]
        assert len(places) <= 1, places
