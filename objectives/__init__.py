"""Training objectives beyond the tasks' own losses, all run by the shared trainer: DPO (dpo.py,
pairs.py), SMART (smart.py), multi-task training (multitask.py) and ensembling (ensemble.py)."""
