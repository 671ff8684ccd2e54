"""Sampling responses from the student: :mod:`.hf_generate` (Hugging Face ``generate``) and
:mod:`.vllm_engine` (an in-process vLLM engine that gets the student's weights before every
rollout). Both have ``sample(model, prompts, seed)`` and ``close()``: the
:class:`~student_trainer.sources.on_policy.RolloutBackend` the on-policy source drives."""
