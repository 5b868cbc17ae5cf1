"""docs/configuration.md is generated from the schema and must stay in step with it."""

import typing

from pydantic import BaseModel

from cadenza import docs_gen, schema


def all_models(root=schema.CadenzaConfig, seen=None) -> set:
    """Every schema section reachable from the top level, walked independently of docs_gen's section list."""
    seen = set() if seen is None else seen
    if root in seen:
        return seen
    seen.add(root)
    for field in root.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                all_models(ann, seen)
            stack.extend(typing.get_args(ann))
    return seen


def test_generated_reference_is_up_to_date():
    assert docs_gen.DOC_PATH.read_text() == docs_gen.render(), "run: python -m cadenza.docs_gen"


def test_every_section_and_key_is_documented_with_a_meaning():
    documented = {model for _, model, _ in docs_gen.SECTIONS}
    missing = all_models() - documented
    assert not missing, f"schema sections missing from docs_gen.SECTIONS: {missing}"
    text = docs_gen.render()
    for _, model, prefix in docs_gen.SECTIONS:
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            assert f"| `{key}` |" in text
            assert field.description or schema.COMMON_DESCRIPTIONS.get(name), f"{model.__name__}.{name}"


def test_known_rows():
    text = docs_gen.render()
    assert "| `trainer.epochs` | int (≥ 1) | `10` |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `input_features[].encoder.reduce_output`"))
    assert "`mean`" in row and "`last`" in row and "| `mean` |" in row
    assert "- `trainer.optimizer.type` (Optimizer): Ludwig: adam." in text
