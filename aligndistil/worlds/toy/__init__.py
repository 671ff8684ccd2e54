"""The embedded default (DESIGN §5): a toy world built offline on a CPU.

- :mod:`.task`    — sorting a short list of numbers, with an exact gold reward;
- :mod:`.build`   — a word-level tokenizer with a chat template and a tiny Llama model, saved as
  an ordinary Hugging Face folder, plus noisy demonstrations and prompt files;
- :mod:`.sft`     — supervised fine-tuning on ``{"messages": [...]}`` rows;
- :mod:`.pairs`   — preference pairs sampled from a model and labelled by the gold reward,
  written as UltraFeedback-style JSONL.
"""
