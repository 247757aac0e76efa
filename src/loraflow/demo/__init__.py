"""The demo: the whole paper in miniature on a CPU: a synthetic bilingual world (`world`), a tiny
base model pretrained from scratch (`base`) and the pipeline that trains LoRAs and a gate and
evaluates every method through the library's functions (`pipeline`).

Sits above training and evaluation; only the CLI imports it.
"""
