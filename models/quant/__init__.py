"""Weight-only quantization of our GPT-2: round-to-nearest int8 / int4 (`primitives`, `modules`),
GPTQ (`gptq`), quantization-aware training (`qat`) and quantized checkpoints (`io`).
See docs/quantization.md."""
from models.quant.gptq import gptq_quantize_model, gptq_quantize_weight
from models.quant.io import load_quantized, save_quantized
from models.quant.modules import (LINEAR_LAYERS, QuantizedEmbedding, QuantizedLinear, is_quantized, linear_bytes,
                           linear_layers, model_bytes, quantize_embedding, quantize_linears)
from models.quant.primitives import QuantSpec, dequantize, fake_quantize, pack_int4, quantize, unpack_int4
from models.quant.qat import FakeQuantLinear, convert_qat, prepare_qat, qat_spec

__all__ = ["LINEAR_LAYERS", "FakeQuantLinear", "QuantSpec", "QuantizedEmbedding", "QuantizedLinear", "convert_qat",
           "dequantize", "fake_quantize", "gptq_quantize_model", "gptq_quantize_weight", "is_quantized",
           "linear_bytes", "linear_layers", "load_quantized", "model_bytes", "pack_int4", "prepare_qat", "qat_spec",
           "quantize", "quantize_embedding", "quantize_linears", "save_quantized", "unpack_int4"]
