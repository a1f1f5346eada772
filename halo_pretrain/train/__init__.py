"""halo-train: DeepSpeed pretraining with exact resume. See docs/training.md."""
