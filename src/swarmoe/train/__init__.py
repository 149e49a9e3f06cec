"""Training and fine-tuning of K2-architecture MoE models (`swarmoe train`).

This layer imports `model`, `text` and `config`; nothing below it imports it.
"""
