"""aidc operator: reconciles TrainingJobs and InferenceServices (kopf)."""
