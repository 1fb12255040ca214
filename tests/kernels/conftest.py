"""Shared setup for the rlhf_kernels tests: the Triton kernels run on CPU through the interpreter.

TRITON_INTERPRET must be set before triton is imported: `@triton.jit` chooses interpreter or
compiler when our kernel modules are imported. Tests that compare the kernels with the torch
references also pass backend="triton" explicitly, so that neither the environment nor `auto`
decides what they check. If some earlier test module imported rlhf_kernels without the
interpreter, the Triton-path tests are skipped with that reason rather than failing obscurely.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf_kernels import _dispatch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _dispatch.TRITON_INTERPRETED:
        return
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="rlhf_kernels was imported before TRITON_INTERPRET=1 was set")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if str(item.fspath).startswith(here) and params.get("backend") == "triton":
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
