"""Decoder LLMs for multimodal prompt tuning: a Flax Llama-architecture decoder (`llama.py`), strict loading of
Hugging Face safetensors and GGUF weights with the GGUF's own tokenizer (`loading.py`, `gguf_tokenizer.py`), and
LoRA adapters with a frozen base (`lora.py`); multimodal prompt tuning on top of them: prompt templates with
<cxr>/<ecg> placeholders (`prompts.py`) and the trainer that fills them with soft tokens projected from frozen
MEDBind embeddings (`prompt_tuning.py`; `python main.py --config=configs/prompt_tuning.py:medbind_workdir=DIR`).

  from medbind_jax.llm import llama, loading, lora
  pretrained = loading.load_gguf(loading.smollm2_gguf_path(), lora=lora.LoraConfig(targets="q_proj|v_proj"))
  tokens = llama.generate(pretrained.model, params, prompt_ids, max_new_tokens=16)
"""
