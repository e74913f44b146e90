"""Fine-tuning PaliGemma on a PaliGemma JSONL dataset: LoRA adapters (peft) or full, one training loop.

``run.finetune`` is the command's library function; ``loop.train_loop`` is the loop it and the shapes
trainer share. Importing this package imports no torch: the modules import it where they use it.
"""
