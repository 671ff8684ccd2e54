"""teacher_service: the dpo/reverse teacher pair, the target math, the batching engine, the
precompute CLI and the REST server. May import ``storage``; nothing else of ours."""
