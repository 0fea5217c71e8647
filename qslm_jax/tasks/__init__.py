"""The task layer: data, tokenizer, batch keys, metric and loss of every task (QSLM, fine-tuning, KD)."""
