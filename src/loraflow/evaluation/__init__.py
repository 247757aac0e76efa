"""The paper's evaluation protocol: running a method on a test set (`harness`), answer
extraction and scoring (`scoring`), isolated execution of generated code (`sandbox`), the Avg
and LoRAHub baselines (`baselines`) and the results table (`report`).

Imports `loraflow.common`, `loraflow.data` and `loraflow.core`; never training or the CLI.
"""
