"""Which weights train, and what is written at the end: a PEFT adapter, a merged or a full checkpoint.

What is decided here:

- Adapters go where ``target`` says, named by a regular expression over module paths (peft
  full-matches a string ``target_modules``): ``attention`` is q/k/v/o_proj of the Gemma decoder
  (``language_model``), ``attention+mlp`` adds gate/up/down_proj, ``all`` adds the SigLIP tower's
  q/k/v/out_proj and fc1/fc2 and the projector's linear. Restricting the names to
  ``language_model`` is what keeps ``freeze_vision`` true for the first two.
- ``full`` trains every weight (the vision tower and projector too unless ``freeze_vision``); no peft.
- An adapter directory is peft's own (``adapter_config.json`` with ``base_model_name_or_path`` set to
  the base as given, absolute when it is a folder, and ``adapter_model.safetensors``) plus the base's
  processor, so ``PeftModel.from_pretrained`` and our export both find everything beside it.
- A merged or full checkpoint is saved in the base checkpoint's own dtype (a bf16 base stays bf16),
  with its processor and generation config: ``export`` takes it like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from .options import FinetuneOptions

_LANGUAGE = r".*language_model\.layers\.\d+\."
_VISION = r".*vision_tower\..*layers\.\d+\."
TARGET_PATTERNS = {
    "attention": rf"{_LANGUAGE}self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "attention+mlp": rf"{_LANGUAGE}(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "all": rf"({_LANGUAGE}(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
           rf"|{_VISION}(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
           r"|.*multi_modal_projector\.linear)",
}
VISION_PARTS = ("vision_tower", "multi_modal_projector")


def prepare_model(model, options: FinetuneOptions):
    """``model`` made ready to train: wrapped with LoRA adapters (peft), or all weights trainable for ``full``."""
    if options.full:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not (options.freeze_vision and any(part in name for part in VISION_PARTS)))
        return model
    from peft import LoraConfig, get_peft_model

    # peft annotates lora_alpha as int but only divides by it (alpha / r): a fractional alpha works as given.
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,  # type: ignore[arg-type]
                        lora_dropout=options.lora_dropout, target_modules=TARGET_PATTERNS[options.target],
                        bias="none")
    return get_peft_model(model, config)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def base_reference(base: str | Path) -> str:
    """How the base is recorded: an absolute folder path, or the hub id as given."""
    path = Path(base)
    return str(path.resolve()) if path.exists() else str(base)


def save_adapter(model, processor, directory: Path, base: str | Path) -> None:
    """peft's adapter directory, with the base recorded and the base's processor beside it."""
    model.peft_config["default"].base_model_name_or_path = base_reference(base)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def save_checkpoint_dir(model, processor, directory: Path, dtype) -> None:
    """A full Hugging Face checkpoint (a PeftModel is merged first) in ``dtype``."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.to(dtype).save_pretrained(directory)
    processor.save_pretrained(directory)
