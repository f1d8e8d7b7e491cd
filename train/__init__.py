"""Finetuning, zero-shot and linear-probe evaluation (DESIGN §5-§6)."""
