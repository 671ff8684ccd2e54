"""student_trainer: losses, streaming data, rollouts, the teacher HTTP client and the training
loops. May import ``storage`` — never ``teacher_service`` (they meet in the store and over HTTP)."""
