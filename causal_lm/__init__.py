"""What the teacher service and the student trainer must compute identically about a causal LM.

- :mod:`.positions` — which logit row predicts which response token (row ``P + t - 1`` predicts
  response token ``t``);
- :mod:`.head` — the decoder's hidden states at those rows, and the LM head with the model's own
  post-processing (logit scale, soft-capping) cut to the tokenizer's vocabulary;
- :mod:`.loading` — safe loading of local model and tokenizer folders (safetensors only, no
  remote code unless asked), device and dtype resolution.

Both sides import this package; it imports only ``storage`` (for the error root), so neither
side ever needs the other. If a rule here changes, the teacher's targets and the student's
logits change together.
"""
