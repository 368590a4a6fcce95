"""Fine-tuning by module swap: LoRA adapters over any linear (`LoRALinear`), QLoRA over NF4 bases,
merging, and adapters in Hugging Face PEFT's format. Training itself is lmstack.train's loop."""

from lmstack.finetune.lora import (
    ALL_LINEAR,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    unmerge_lora,
)
from lmstack.finetune.peft import (
    load_adapter,
    nf4_double_quant,
    quantized_base,
    read_adapter,
    save_adapter,
    use_adapter,
)
from lmstack.finetune.qlora import (
    AbsmaxNF4Linear,
    DoubleQuantNF4Linear,
    NF4Linear,
    base_weight_bytes,
    dequantize_nf4,
    quantize_nf4,
    require_nf4,
)

__all__ = [
    "ALL_LINEAR", "AbsmaxNF4Linear", "DoubleQuantNF4Linear", "LoRAConfig", "LoRALinear", "NF4Linear", "apply_lora", "base_weight_bytes",
    "dequantize_nf4", "load_adapter", "load_lora_state_dict", "lora_modules", "lora_state_dict",
    "merge_lora", "nf4_double_quant", "quantize_nf4", "quantized_base", "read_adapter", "remove_lora", "require_nf4",
    "save_adapter", "unmerge_lora", "use_adapter",
]
