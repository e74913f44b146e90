"""`export` of a PEFT LoRA adapter directory: merged at export, tokens of the PEFT model, recorded in the manifest.

The adapters are made here with peft on the tiny checkpoints, their lora_B weights set to random
values (peft initialises them to zero, which would leave the outputs unchanged), and saved with
save_pretrained, as a fine-tuning run leaves them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.bundle.manifest import (
    MANIFEST_NAME, SCHEMA_VERSION, AdapterRecord, read_manifest, sha256_file,
)

from .conftest import MAX_SEQ_LEN, Reference, model_id, run_cli

NEW_TOKENS = 12
PROMPTS = ["caption en", "answer en what is the quick brown fox doing"]
# Attention and MLP projections of the decoder; q_proj and v_proj also name SigLIP's, so both towers change.
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
ADAPTED_MODELS = [(1, 28), (2, 28)]


class PeftReference(Reference):
    """transformers' PaliGemma with the adapter applied by peft, unmerged: what the user trained."""

    def __init__(self, checkpoint: Path, adapter: Path):
        super().__init__(checkpoint)
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, adapter).eval()


def make_adapter(checkpoint: Path, output: Path, targets: list[str] = TARGETS, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(output))
    return output


def tokens_of_cli(bundle: Path, image: Path) -> list[list[int]]:
    args = ["run", str(bundle), "--image", str(image), "--json", "--max-new-tokens", str(NEW_TOKENS)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    result = run_cli(*args, check=True)
    return [json.loads(line)["token_ids"] for line in result.stdout.splitlines()]


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def adapters(checkpoints, workdir) -> dict[tuple[int, int], Path]:
    return {model: make_adapter(checkpoints[model], workdir / f"{model_id(model)}-lora") for model in ADAPTED_MODELS}


@pytest.fixture(scope="module")
def adapter_bundles(adapters, checkpoints, workdir) -> dict[tuple[int, int], Path]:
    """Family 1 finds its base in adapter_config.json; family 2 is given it with --base."""
    out = {}
    for model, adapter in adapters.items():
        bundle = workdir / f"{model_id(model)}-lora-bundle"
        base = ["--base", str(checkpoints[model])] if model[0] == 2 else []
        run_cli("export", str(adapter), "-o", str(bundle), "--max-seq-len", str(MAX_SEQ_LEN), *base, check=True)
        out[model] = bundle
    return out


@pytest.mark.parametrize("model", ADAPTED_MODELS, ids=model_id)
def test_adapter_bundle_gives_the_peft_models_tokens(model, adapters, adapter_bundles, checkpoints, references, images):
    expected = PeftReference(checkpoints[model], adapters[model]).generate([images[0]] * 2, PROMPTS, NEW_TOKENS)
    assert tokens_of_cli(adapter_bundles[model], images[0]) == expected
    # Else the test could not tell an adapter that was lost on the way from one that was merged.
    assert expected != references[model].generate([images[0]] * 2, PROMPTS, NEW_TOKENS)


def test_merged_checkpoint_exports_to_the_same_tokens(adapters, adapter_bundles, checkpoints, images, tmp_path):
    model = (2, 28)
    reference = PeftReference(checkpoints[model], adapters[model])
    merged = tmp_path / "merged-checkpoint"
    reference.model.merge_and_unload().save_pretrained(merged)
    reference.processor.save_pretrained(merged)
    bundle = tmp_path / "merged-bundle"
    run_cli("export", str(merged), "-o", str(bundle), "--max-seq-len", str(MAX_SEQ_LEN), check=True)
    assert read_manifest(bundle).adapter is None
    assert tokens_of_cli(bundle, images[1]) == tokens_of_cli(adapter_bundles[model], images[1])


def recorded_adapter(bundle: Path) -> AdapterRecord:
    record = read_manifest(bundle).adapter
    assert record is not None, f"{bundle}: the manifest records no adapter"
    return record


def test_manifest_records_adapter_and_base(adapters, adapter_bundles, checkpoints):
    model = (1, 28)
    manifest = read_manifest(adapter_bundles[model])
    record, adapter, base = recorded_adapter(adapter_bundles[model]), adapters[model], checkpoints[model]
    assert manifest.schema_version == SCHEMA_VERSION == 4
    assert (record.name, record.peft_type, record.rank, record.alpha) == (adapter.name, "LORA", 4, 8.0)
    assert record.target_modules == tuple(sorted(TARGETS))
    assert record.weights_file == "adapter_model.safetensors"
    assert record.sha256 == sha256_file(adapter / "adapter_model.safetensors")
    assert record.base.source == str(base) and record.base.revision is None
    assert record.base.weights_sha256 == recorded_adapter(adapter_bundles[(1, 28)]).base.weights_sha256
    assert record.base.weights_sha256 != recorded_adapter(adapter_bundles[(2, 28)]).base.weights_sha256
    assert manifest.validation["passed"] and "peft" in manifest.validation["reference"]
    assert "peft" in manifest.versions
    summary = run_cli("inspect", str(adapter_bundles[model]), check=True).stdout
    adapter_line = next(line for line in summary.splitlines() if line.startswith("adapter"))
    assert "LORA" in adapter_line and "rank 4" in adapter_line and str(base) in adapter_line
    inspected = json.loads(run_cli("inspect", str(adapter_bundles[model]), "--json", check=True).stdout)
    assert inspected["adapter"]["sha256"] == record.sha256


def test_schema_2_manifests_still_read(adapter_bundles, bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(adapter_bundles[(2, 28)], bundle)
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    old = {k: v for k, v in data.items() if k != "adapter"} | {"schema_version": 2}
    (bundle / MANIFEST_NAME).write_text(json.dumps(old))
    manifest = read_manifest(bundle)
    assert manifest.adapter is None and manifest.schema_version == SCHEMA_VERSION
    (bundle / MANIFEST_NAME).write_text(json.dumps(data | {"schema_version": 2}))
    with pytest.raises(InputError, match="schema 2 manifest cannot hold an 'adapter'"):
        read_manifest(bundle)
    assert read_manifest(bundles[(1, 28)]).adapter is None


def test_validation_compares_with_the_unmerged_peft_model(adapters, tmp_path, monkeypatch):
    """An export that drops the adapter instead of merging it fails validation: the reference is the PEFT model."""
    from paligemma_edge.export import adapter as adapter_module
    from paligemma_edge.export import bundle as bundle_module
    from paligemma_edge.export.validate import ValidationError

    def unload_without_merging(checkpoint):
        return adapter_module.replace(checkpoint, model=checkpoint.model.unload())

    monkeypatch.setattr(bundle_module, "merge_adapter", unload_without_merging)
    with pytest.raises(ValidationError, match="ONNX Runtime logits differ"):
        bundle_module.export_bundle(str(adapters[(2, 28)]), tmp_path / "b", bundle_module.ExportOptions(max_seq_len=40))
    assert not (tmp_path / "b").exists()


def edited_copy(adapter: Path, target: Path, **config) -> Path:
    shutil.copytree(adapter, target)
    path = target / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return target


def test_missing_base_gets_one_line(adapters, tmp_path):
    adapter = edited_copy(adapters[(1, 28)], tmp_path / "lora", base_model_name_or_path=str(tmp_path / "gone"))
    line = one_line_error(run_cli("export", str(adapter), "-o", str(tmp_path / "b")))
    assert f"base model {tmp_path / 'gone'} is not there; pass --base DIR" in line
    assert not (tmp_path / "b").exists()


def test_base_given_to_a_full_checkpoint_is_refused(checkpoints, tmp_path):
    from paligemma_edge.export.bundle import ExportOptions, export_bundle

    with pytest.raises(InputError, match="--base applies to a PEFT adapter directory"):
        export_bundle(str(checkpoints[(1, 28)]), tmp_path / "b", ExportOptions(base=str(checkpoints[(2, 28)])))


def test_adapter_without_weights_gets_one_line(adapters, tmp_path):
    adapter = edited_copy(adapters[(1, 28)], tmp_path / "lora")
    (adapter / "adapter_model.safetensors").unlink()
    line = one_line_error(run_cli("export", str(adapter), "-o", str(tmp_path / "b")))
    assert "adapter has no weights (adapter_model.safetensors or adapter_model.bin)" in line


def test_non_lora_adapter_names_what_is_supported(adapters, tmp_path):
    adapter = edited_copy(adapters[(1, 28)], tmp_path / "prefix", peft_type="PREFIX_TUNING")
    line = one_line_error(run_cli("export", str(adapter), "-o", str(tmp_path / "b")))
    assert "a PREFIX_TUNING adapter; export merges LORA adapters only" in line


def test_target_modules_absent_from_paligemma_get_one_line(adapters, tmp_path):
    adapter = edited_copy(adapters[(1, 28)], tmp_path / "gpt2-lora", target_modules=["c_attn"])
    line = one_line_error(run_cli("export", str(adapter), "-o", str(tmp_path / "b")))
    assert "adapter does not fit PaliGemma base" in line and "c_attn" in line


@pytest.fixture(scope="module")
def llama_adapter(workdir) -> Path:
    """A LoRA adapter made on a tiny Llama: its q_proj / v_proj names exist in PaliGemma, its module paths do not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = workdir / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=1408)).save_pretrained(base)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(workdir / "llama-lora")
    return workdir / "llama-lora"


def test_adapter_for_another_architecture_gets_one_line(llama_adapter, checkpoints, tmp_path):
    line = one_line_error(run_cli("export", str(llama_adapter), "-o", str(tmp_path / "b")))
    assert "a llama checkpoint, not PaliGemma" in line
    # Pointed at a PaliGemma base, peft attaches to same-named modules and would only warn about the rest.
    onto_paligemma = edited_copy(llama_adapter, tmp_path / "lora", base_model_name_or_path=str(checkpoints[(1, 28)]))
    line = one_line_error(run_cli("export", str(onto_paligemma), "-o", str(tmp_path / "b")))
    assert "adapter does not fit PaliGemma base" in line and "another architecture" in line
    assert not (tmp_path / "b").exists()
