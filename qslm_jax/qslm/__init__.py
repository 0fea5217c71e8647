"""QSLM: batched evaluation of quantization candidates, metrics, tiered search, selection and reports."""
