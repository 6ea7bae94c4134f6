"""QAT for code language models: recipes, fake quantization, PTQ baselines and one accelerate trainer."""

from qat.config import QuantConfig, Recipe, load_recipe
from qat.modules import FakeQuantLinear, QuantizedLinear
from qat.swap import convert, prepare, set_fake_quant

__all__ = [
    "FakeQuantLinear",
    "QuantConfig",
    "QuantizedLinear",
    "Recipe",
    "convert",
    "load_recipe",
    "prepare",
    "set_fake_quant",
]
