"""Training: few-shot gate training and LoRA training under Accelerate with the official recipe,
best/last checkpoints, resume, dev-loss and dev-accuracy selection.

Imports the core engine, data and (for dev accuracy) evaluation's scoring; never serving, the
demo or the CLI.
"""
