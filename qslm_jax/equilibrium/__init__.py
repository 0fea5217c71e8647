"""Equilibrium training: implicit differentiation at a fixed point, knowledge-distillation losses."""
