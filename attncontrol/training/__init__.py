"""Training scripts (concept extraction, LoRA, linear-attention distillation) built on accelerate and peft."""
