"""Data formats and prompts: the authors' few-shot train/dev/test files, prompt templates
(official, released, llama2, chat, plain), the evaluation protocol's prompts and stop strings,
tokenisation with response-only labels and batching.

Imports only `loraflow.common`; torch is imported only by the functions that build tensors.
"""
