"""The fusion engine: PEFT adapter loading, the stacked `FusedLoraLinear`, per-layer fusion
gates, attaching both to an unmodified Hugging Face decoder through modules and hooks,
`LoraFlowModel`, gate checkpoints (loraflow and official), generation and fusion-weight
inspection.

Imports `loraflow.common` and `loraflow.data`; never training, evaluation, serving or the CLI.
"""
