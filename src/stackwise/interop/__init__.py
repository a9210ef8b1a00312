"""Models in and out: Hugging Face Llama-family checkpoints to and from stackwise racks.

`names` maps parameter names both ways; `hf_export` writes a folder `transformers` loads as a
Llama; `hf_import` reads a Llama / Mistral / Qwen2 folder into a StackWiseModel. Nothing here
imports `transformers`: the formats are config.json, safetensors and tokenizer.json.
"""
