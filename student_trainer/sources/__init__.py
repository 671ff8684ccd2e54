"""Where each optimizer step's records come from: :mod:`.store` (off-policy) or
:mod:`.on_policy` (rollouts scored by the teacher server), both on :mod:`.plan`'s step plan."""
