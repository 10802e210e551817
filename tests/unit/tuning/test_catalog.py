import pytest

from controlplane.engines.tiny_model import TinyModelSpec
from controlplane.tuning import catalog
from controlplane.tuning.catalog import CatalogError, KvPrecision, WeightPrecision

REQUIRED_GPUS = ("H100-80GB", "H200", "A100-80GB", "L40S", "L4", "A10G")
REQUIRED_MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Qwen2.5-7B", "Qwen2.5-32B", "Mistral-7B", "tiny")


def test_the_catalog_holds_every_required_accelerator_and_model_with_a_source() -> None:
    for name in REQUIRED_GPUS:
        a = catalog.accelerator(name)
        assert a.bf16_flops > 0 and a.memory_bytes > 0 and a.memory_bw_bytes_s > 0 and a.usd_per_hour > 0
        assert a.source and "assumed" in a.price_source
    for name in REQUIRED_MODELS:
        assert catalog.model(name).source


@pytest.mark.parametrize("name", [m for m in REQUIRED_MODELS if m != "tiny"])
def test_each_model_shape_adds_up_to_its_published_parameter_count_within_one_percent(name: str) -> None:
    m = catalog.model(name)
    assert m.published_params is not None
    assert m.params == pytest.approx(m.published_params, rel=0.01)


def test_the_parameter_formula_matches_transformers_exactly_for_llama_8b_and_the_tiny_model() -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("Llama-3.1-8B", "tiny"):
        m = catalog.model(name)
        config = transformers.LlamaConfig(
            vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.intermediate,
            num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
            tie_word_embeddings=m.tied_embeddings)
        with torch.device("meta"):
            built = transformers.LlamaForCausalLM(config)
        assert m.params == sum(p.numel() for p in built.parameters()), name


def test_the_tiny_model_entry_has_the_shape_tiny_model_py_builds() -> None:
    spec, m = TinyModelSpec(), catalog.model("tiny")
    assert (m.layers, m.hidden, m.heads, m.kv_heads, m.intermediate, m.vocab) == (
        spec.num_hidden_layers, spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads,
        spec.intermediate_size, spec.vocab_size)
    assert m.head_dim * m.heads == m.hidden


def test_llama_8b_keeps_128_kib_of_kv_per_token_in_bf16_and_half_that_in_fp8() -> None:
    m = catalog.model("Llama-3.1-8B")
    assert m.kv_bytes_per_token(KvPrecision.BF16) == 128 * 1024
    assert m.kv_bytes_per_token(KvPrecision.FP8) == 64 * 1024


def test_flops_are_the_dense_figures_and_fp8_falls_back_to_16_bit_where_the_gpu_has_no_fp8() -> None:
    h100, a100, l4 = catalog.accelerator("H100-80GB"), catalog.accelerator("A100-80GB"), catalog.accelerator("L4")
    assert h100.bf16_flops == pytest.approx(989.4e12)  # the datasheet's 1,979 with sparsity, halved
    assert h100.peak_flops(WeightPrecision.FP8) == pytest.approx(2 * h100.bf16_flops, rel=1e-3)
    assert l4.peak_flops(WeightPrecision.FP8) == pytest.approx(2 * l4.bf16_flops, rel=0.01)
    assert a100.fp8_flops is None and a100.peak_flops(WeightPrecision.FP8) == a100.bf16_flops
    assert h100.peak_flops(WeightPrecision.INT4) == h100.bf16_flops  # weight-only kernels


def test_weight_and_kv_precisions_carry_their_bytes() -> None:
    assert [p.bytes_per_weight for p in WeightPrecision] == [2.0, 1.0, 1.0, 0.5]
    assert [p.bytes_per_element for p in KvPrecision] == [2.0, 1.0]


def test_hugging_face_ids_and_short_names_resolve() -> None:
    assert catalog.model("meta-llama/Llama-3.1-8B-Instruct").name == "Llama-3.1-8B"
    assert catalog.model("qwen/qwen2.5-32b-instruct").name == "Qwen2.5-32B"
    assert catalog.accelerator("h100").name == "H100-80GB"


def test_unknown_names_are_errors_listing_what_is_known() -> None:
    with pytest.raises(CatalogError, match="unknown accelerator 'B300'; known: H100-80GB, H200"):
        catalog.accelerator("B300")
    with pytest.raises(CatalogError, match="unknown model 'gpt-5'.*Llama-3.1-8B"):
        catalog.model("gpt-5")
    with pytest.raises(CatalogError, match="allowed: bf16, fp8, int8, int4"):
        catalog.weight_precision("fp4")
    with pytest.raises(CatalogError, match="allowed: bf16, fp8"):
        catalog.kv_precision("int8")
