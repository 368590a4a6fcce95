"""The compress layer: weight-only quantization (RTN, GPTQ) into `kernels` modules, quantized
model directories, and the distillation loss.

    kept = quantize_(model, "gptq-int4", group_size=128, calibration=batches)
    save_quantized(model, "out/", tokenizer, method="gptq-int4")
    model = load_quantized("out/")          # or lmstack.infer.loading.load_model("out/")
    loss_fn = distillation_loss(teacher, temperature=2.0, alpha=0.5)   # for lmstack.train.train
"""

from lmstack.compress.checkpoint import (
    describe,
    is_quantized_dir,
    load_quantized,
    resident_bytes,
    save_quantized,
)
from lmstack.compress.distill import DistillConfig, distillation_loss, kl_sum
from lmstack.compress.quantize import (
    METHODS,
    gptq_int4,
    quantize_,
    rtn_int4,
    rtn_int4_embedding,
    rtn_int8,
    rtn_int8_embedding,
)

__all__ = ["METHODS", "DistillConfig", "describe", "distillation_loss", "gptq_int4",
           "is_quantized_dir", "kl_sum", "load_quantized", "quantize_", "resident_bytes", "rtn_int4",
           "rtn_int4_embedding",
           "rtn_int8", "rtn_int8_embedding", "save_quantized"]
