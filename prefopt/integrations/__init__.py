"""prefopt inside the trainers people already run.

- ``prefopt.integrations.trl``: ``enable()`` routes TRL's DPOTrainer and KTOTrainer (and every TRL
  trainer that scores completions through TRL's fused LM head or its ``selective_log_softmax``)
  through prefopt; ``disable()`` restores TRL's own functions.
- ``prefopt.integrations.transformers``: per-token log-probs and softmax statistics of a
  Hugging Face causal LM through the fused linear path, without computing its logits.

Importing this package imports neither TRL nor Transformers; ``enable()`` imports TRL when called.
"""
