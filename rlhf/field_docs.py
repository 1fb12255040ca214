"""The one-line "why" of each config field, read from the comment beside it in the dataclass source.

The comments that cite a default's source (STYLE.md section 3) are the documentation; `--help`
reads them rather than keeping a second copy. A field's text is, in this order of preference:

    lr: float = 1e-3  # the comment on its line(s)
    # and the comment lines right below it, no blank line between (a long comment's continuation)

    path: str = ""
    \"\"\"a docstring right below it\"\"\"

    # a comment block right above it, after a blank line (or the class line)
    quantization: Literal["nf4", "none"] = "nf4"

So a comment that introduces the next field needs a blank line above it; without one it continues
the field before.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment or docstring, joined into one line} for dataclass `cls`."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class built at run time): no descriptions
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()  # lines holding anything but a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
            code_lines.update(range(token.start[0], token.end[0] + 1))
    blank = {n for n, text in enumerate(source.splitlines(), 1) if not text.strip()}

    def comment_only(line: int) -> bool:
        return line in comments and line not in code_lines

    classdef = ast.parse(source).body[0]
    assert isinstance(classdef, ast.ClassDef), classdef
    body = classdef.body
    first = body[0]
    class_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    # a comment block above a field is its own when it starts a paragraph
    paragraph_starts = blank | {classdef.lineno} | ({first.end_lineno} if class_docstring else set())
    docs = {}
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        parts = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        line = stmt.end_lineno + 1
        while comment_only(line):
            parts.append(comments[line])
            line += 1
        nxt = body[i + 1] if i + 1 < len(body) else None
        if not parts and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            parts = [" ".join(inspect.cleandoc(nxt.value.value).split())]
        if not parts:
            line = stmt.lineno - 1
            while comment_only(line):
                line -= 1
            if line < stmt.lineno - 1 and line in paragraph_starts:
                parts = [comments[n] for n in range(line + 1, stmt.lineno)]
        if parts:
            docs[stmt.target.id] = " ".join(parts)
    return docs

