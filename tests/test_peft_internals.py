"""The peft internals rlhf.models relies on (rlhf/models/peft_internals.py), checked against the
installed peft: a release that renames or drops one fails here, naming it, not deep in a PPO run."""

from __future__ import annotations

import peft
import pytest
from packaging.specifiers import SpecifierSet
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from rlhf.models import peft_internals


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.out(self.q_proj(x))


def lora_model(use_dora: bool = False):
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=use_dora, init_lora_weights=False)
    model = get_peft_model(TwoLinears(), config, adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    return model


def test_lora_layers_have_the_attributes_we_use():
    layers = peft_internals.tuner_layers(lora_model())
    assert len(layers) == 1
    missing = peft_internals.missing_layer_attributes(layers[0])
    assert not missing, (
        f"peft {peft.__version__}: LoRA layers no longer have {missing}, which rlhf/models/peft_internals.py "
        f"relies on (tested range: peft{peft_internals.TESTED_PEFT}); adapt peft_internals.py or pin peft"
    )


def test_show_adapter_selects_what_the_forward_adds():
    # the private flags must still be what each layer's forward reads: same outputs as peft's set_adapter
    model = lora_model()
    layers = peft_internals.tuner_layers(model)
    x = torch.randn(3, 8)
    expected = {}
    for adapter in ("first", "second"):
        model.base_model.enable_adapter_layers()
        model.set_adapter(adapter)
        expected[adapter] = model(x)
    with model.disable_adapter():
        expected[None] = model(x)
    for adapter in ("second", None, "first", None, "second"):
        peft_internals.show_adapter(layers, model.base_model, adapter)
        assert torch.equal(model(x), expected[adapter]), (
            f"peft {peft.__version__}: setting {peft_internals.PRIVATE_LAYER_FLAGS} no longer selects the adapter "
            f"(tested range: peft{peft_internals.TESTED_PEFT}); adapt rlhf/models/peft_internals.py"
        )
    peft_internals.hide_adapters(layers)
    assert torch.equal(model(x), expected[None])


def test_plain_lora_arithmetic_is_what_the_row_mixed_forward_computes():
    # peft's LoRA Linear must still be base(x) + lora_B(lora_A(dropout(x))) * scaling
    model = lora_model()
    layer = peft_internals.tuner_layers(model)[0]
    assert peft_internals.is_plain_lora(layer, "first")
    x = torch.randn(3, 8)
    peft_internals.show_adapter([layer], model.base_model, "first")
    by_hand = layer.base_layer(x) + layer.lora_B["first"](layer.lora_A["first"](x)) * layer.scaling["first"]
    assert torch.allclose(layer(x), by_hand, atol=1e-6), (
        f"peft {peft.__version__}: the LoRA Linear forward changed (tested range: peft{peft_internals.TESTED_PEFT})"
    )


def test_dora_is_not_plain_lora():
    layer = peft_internals.tuner_layers(lora_model(use_dora=True))[0]
    assert not peft_internals.is_plain_lora(layer, "first")
    assert peft_internals.is_plain_lora(layer, "second")
    assert peft_internals.is_plain_lora(layer, "absent")


def test_adapter_parameters_are_one_adapters_lora_weights():
    model = lora_model()
    first = peft_internals.adapter_parameters(model, "first")
    assert len(first) == 2 and {tuple(p.shape) for p in first} == {(2, 8), (8, 2)}
    assert not {id(p) for p in first} & {id(p) for p in peft_internals.adapter_parameters(model, "second")}


def test_installed_peft_is_in_the_tested_range():
    if peft.__version__ not in SpecifierSet(peft_internals.TESTED_PEFT):
        pytest.fail(f"peft {peft.__version__} is outside the tested range {peft_internals.TESTED_PEFT}: run "
                    "tests/test_peft_internals.py, test_models.py and test_model_families.py, then widen "
                    "TESTED_PEFT and pyproject.toml")


def test_pyproject_pins_the_tested_range():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    peft_requirement = next(Requirement(d) for d in pyproject["project"]["dependencies"] if d.startswith("peft"))
    assert str(peft_requirement.specifier) == str(SpecifierSet(peft_internals.TESTED_PEFT))
