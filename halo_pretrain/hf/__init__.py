"""The Hugging Face form of a release: transformers config and model wrapper, tokenizer.json, Llama export.

Needs the `hf` extra (`pip install halo-pretrain[hf]`). `halo-export` writes what these modules describe;
an exported directory then loads with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`.
"""
