"""The names and defaults the command lines offer, as plain data, so that building a parser (and answering
``--help``) imports no JAX. Each mirrors the library table named beside it; ``tests/test_cli_help.py`` checks
that they agree."""

SPIKEGPT_PRESETS = ("spikegpt216m", "spikegpt-small", "spikegpt-micro", "spikegpt-tiny")  # models.spikegpt.PRESETS
SPIKINGBERT_PRESETS = ("full", "small", "micro", "tiny")  # models.spikingbert.SPIKINGBERT_PRESETS
MODEL_PRESETS = ("spikegpt216m", "spikegpt-small", "spikegpt-micro", "spikegpt-tiny", "spikingbert-full",
                 "spikingbert-small", "spikingbert-micro", "spikingbert-tiny", "bert-base",
                 "bert-small")  # models.registry.all_presets()
EMBEDDED_PRESET = "spikegpt-small"  # finetune.finetuning.EMBEDDED_PRESET
MODES = ("gpt", "rnn")  # models.spikegpt.MODES
TASKS = ("sst2", "mrpc", "qnli", "wikitext2")  # tasks.task.TASKS
LM_TRAIN_TEXTS = ("wikitext2-valid", "wikitext2-valid+glue")  # tasks.data.LM_TRAIN_TEXTS
CASES = ("a1", "a2", "a3", "b1", "b2", "b3")  # qslm.settings.CASES
STRATEGIES = ("tiered", "knapsack")  # qslm.settings.STRATEGIES
DEFAULT_LEVELS = (32, 16, 12, 8, 6, 4, 3, 2)  # qslm.settings.DEFAULT_LEVELS
SELECTION_SPLITS = ("held-out", "same")  # qslm.settings.SELECTION_SPLITS
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)  # qslm.selection.ALPHAS
SCHEMES = ("minmax", "symmetric", "per-channel", "mse", "all-tensors")  # quant.quantizers.QuantScheme.PRESETS
SOLVERS = ("fixed_point", "anderson")  # equilibrium.solvers.SOLVERS
GRADIENT_POINTS = ("surrogate", "equilibrium")  # models.spikingbert.GRADIENT_POINTS
KD_OBJECTIVES = ("internal", "kd", "ce", "kd+ce")  # equilibrium.student.KDObjective.PRESETS
MEMORY_METHODS = ("implicit", "bptt")  # equilibrium.memory.METHODS
