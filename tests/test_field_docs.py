"""rlhf.field_docs reads each config field's comment from the dataclass source (the help's one source)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.field_docs import field_docs


@dataclass
class Example:
    # a heading comment right under the class line belongs to the first field
    first: int = 1
    trailing: int = 2  # on its own line
    continued: float | None = None  # a long comment
    # that goes on below, with no blank line
    documented: str = ""
    """A docstring
    over two lines."""

    # a paragraph of its own: the field below
    leading: str = "x"
    undocumented: int = 0

    # a section heading above a field with its own comment: the field's comment wins
    own: int = 3  # mine
    nested: list[int] = field(default_factory=list)
    # a comment right below a field without one continues it


def test_each_convention():
    assert field_docs(Example) == {
        "first": "a heading comment right under the class line belongs to the first field",
        "trailing": "on its own line",
        "continued": "a long comment that goes on below, with no blank line",
        "documented": "A docstring over two lines.",
        "leading": "a paragraph of its own: the field below",
        "own": "mine",
        "nested": "a comment right below a field without one continues it",
    }


def test_a_class_without_source_has_no_docs():
    made = type("Made", (), {"__annotations__": {"x": int}, "x": 1})
    assert field_docs(dataclass(made)) == {}
