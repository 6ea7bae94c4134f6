"""Post-training quantization baselines (no training, a little calibration data).

- calibrate: run calibration batches through a model and collect per-layer statistics (inputs, Hessians)
- gptq: quantize a layer column by column, letting later columns absorb each rounding error (GPTQ)
- awq: activation-aware per-channel scaling before rounding (AWQ)
- mixed: per-layer sensitivity → per-layer bit widths
- pipeline: the model-level PTQ of a recipe (`quant.init`, `quant.bits`), layer by layer, ending in a prepared
  model whose quantizer state is the PTQ solution (what train.py calls)
"""
