"""Integrations with the training stacks users already run: ``torch.distributed`` checkpoints
(``integrations.distributed``), Hugging Face ``Trainer`` (``integrations.hf``) and Lightning
(``integrations.lightning``). Each module imports its framework only when used."""
