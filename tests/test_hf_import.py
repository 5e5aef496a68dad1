"""HF base import and TP inference against single-device HF transformers (the oracle).

Tolerance: fp32 logits agree to max |diff| <= 1e-5 x max |logit|. Weights are random with
non-trivial norms and biases, so a swapped norm, a wrong bias, a wrong RoPE theta or
scaling, or a wrong fused layout all move the logits by far more (a missing llama3 scaling
moves them by ~1e-3 relative here).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from dist import run_ranks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lora.hf.importer import SafetensorsCheckpoint, read_hf_config, transformer_config_from_hf  # noqa: E402

TOL = 1e-5
PROMPT = [3, 17, 99, 5, 64, 1, 120, 42, 7, 88, 23, 11, 56, 77, 30, 2]
NEW = 6
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192, rope_theta=500000.0)
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2)


def _save(model, path: Path, **kw) -> str:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval().save_pretrained(path, **kw)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, num_attention_heads=8, num_key_value_heads=2, attention_bias=True,
        rope_parameters=LLAMA3, max_position_embeddings=16384, **SMALL))
    torch.manual_seed(0)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=131, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rms_norm_eps=1e-5, **SMALL))
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, **SMALL))
    dirs = {
        "llama": _save(llama, root / "llama"),
        "qwen2": _save(qwen2, root / "qwen2", max_shard_size="40KB"),  # sharded + index
        "qwen3": _save(qwen3, root / "qwen3"),
    }
    assert (root / "qwen2" / "model.safetensors.index.json").is_file()
    refs = {}
    ids = torch.tensor([PROMPT])
    for name, hf in (("llama", llama), ("qwen2", qwen2), ("qwen3", qwen3)):
        with torch.no_grad():
            tokens = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(PROMPT):].tolist()
            # HF stops after an EOS and includes it: take the 3rd greedy token as EOS.
            eos_tokens = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=tokens[2],
                                     pad_token_id=0)[0, len(PROMPT):].tolist()
            refs[name] = dict(logits=hf(ids).logits[0], tokens=tokens, eos_tokens=eos_tokens,
                              state={k: v.clone() for k, v in hf.state_dict().items()})
    return dirs, refs


def _ranks_body(rank, world, dirs, eos):
    """All multi-rank checks in one spawned group: TP=1 (two replicas), then TP=2."""
    from megatron_lora import init_distributed
    from megatron_lora.runtime.generation import forward_logits, generate
    from megatron_lora.hf.importer import hf_biases, load_hf_base, read_hf_config
    from megatron_lora.hf.layout import megatron_full_to_hf

    ids = torch.tensor([PROMPT])
    out = {}
    for tp in (1, 2):
        init_distributed(tp)
        for name, d in dirs.items():
            model, facts = load_hf_base(d)
            r = out[(name, tp)] = {}
            r["logits"] = forward_logits(model, ids)[0]
            r["tokens"], steps = generate(model, PROMPT, NEW, output_logits=True)
            full = forward_logits(model, torch.tensor([PROMPT + r["tokens"][:-1]]))[0, len(PROMPT) - 1:]
            r["cache_vs_full"] = (torch.stack(steps) - full).abs().max().item()
            r["eos_tokens"] = generate(model, PROMPT, NEW, eos_token_id=[999, eos[name]])
            r["sampled"] = generate(model, PROMPT, NEW, temperature=0.8, top_p=0.9, seed=7)
            r["sampled_again"] = generate(model, PROMPT, NEW, temperature=0.8, top_p=0.9, seed=7)
            r["tiny_top_p"] = generate(model, PROMPT, NEW, temperature=1.0, top_p=1e-6)
            r["random_seed"] = generate(model, PROMPT, NEW, temperature=5.0)
            if tp == 1:
                state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
                r["hf_state"] = megatron_full_to_hf(state, facts, hf_biases(read_hf_config(d)))
            del model
    return out


def test_import_and_generate_match_hf(models):
    dirs, refs = models
    eos = {name: ref["tokens"][2] for name, ref in refs.items()}
    ranks = run_ranks(_ranks_body, 2, dirs, eos)
    for name, ref in refs.items():
        scale = ref["logits"].abs().max().item()
        for tp in (1, 2):
            r0, r1 = ranks[0][(name, tp)], ranks[1][(name, tp)]
            assert r0["logits"].shape == ref["logits"].shape  # vocab padding (qwen2: 131) cut off
            diff = (r0["logits"] - ref["logits"]).abs().max().item()
            assert diff <= TOL * scale, (name, tp, diff, scale)
            assert torch.equal(r0["logits"], r1["logits"])
            assert r0["cache_vs_full"] <= TOL * scale, (name, tp, r0["cache_vs_full"])
            assert r0["tokens"] == ref["tokens"], (name, tp)
            assert r0["eos_tokens"] == ref["eos_tokens"] == ref["tokens"][:3]
            assert r0["tiny_top_p"] == ref["tokens"]  # top-p keeps only the argmax
            assert r0["sampled"] == r1["sampled"]
            if tp == 2:  # without a seed, the ranks of one TP group still sample alike
                assert r0["random_seed"] == r1["random_seed"], name
            assert r0["sampled"] == r0["sampled_again"]
        # The Megatron -> HF name map (the oracle mapping of other tests) is exact.
        back = ranks[0][(name, 1)]["hf_state"]
        expected = dict(ref["state"])
        if name == "qwen2":  # tied: no output layer; HF ties lm_head to the embedding on load
            expected.pop("lm_head.weight", None)
        assert back.keys() == expected.keys(), (name, back.keys() ^ expected.keys())
        for k, v in expected.items():
            assert torch.equal(back[k], v), (name, k)


def _word_tokenizer(vocab_size: int):
    """A word-level tokenizer ("w2".."wN") that adds a BOS ("<s>" = 1) by default, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def test_generate_script_torchrun_with_peft_adapter(models, tmp_path):
    """generate.py at TP=2 on the Llama (GQA, llama3 RoPE, biases) + a PEFT LoRA, text prompt.

    (transformers 5 loads a Qwen2 directory's tokenizer as Qwen2Tokenizer whatever was saved,
    so the word-level test tokenizer goes with the Llama.)"""
    from peft import LoraConfig, get_peft_model

    dirs, _ = models
    base = tmp_path / "base"
    shutil.copytree(dirs["llama"], base)
    _word_tokenizer(128).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    words = [i for i in PROMPT if i > 1]
    prompt = " ".join(f"w{i}" for i in words)
    ids = tokenizer(prompt)["input_ids"]
    assert ids == [1] + words
    torch.manual_seed(0)
    hf = get_peft_model(LlamaForCausalLM.from_pretrained(base).eval(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    hf.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        tokens = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    logits_out, tokens_out = tmp_path / "logits.safetensors", tmp_path / "tokens.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "generate.py"), "--base", str(base), "--adapter", str(tmp_path / "peft"),
           "--tp", "2", "--prompt", prompt, "--max-new-tokens", str(NEW),
           "--logits-out", str(logits_out), "--tokens-out", str(tokens_out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = load_file(str(logits_out))["logits"]
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), 128)
    assert (logits - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert json.loads(tokens_out.read_text()) == tokens
    assert proc.stdout.count(tokenizer.decode(tokens, skip_special_tokens=True)) == 1  # rank 0 only


def _config(**kw) -> dict:
    base = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    return {**base, **kw}


def test_config_fields_carried():
    cfg, kw = transformer_config_from_hf(_config(rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                                 vocab_size=131, head_dim=24), tp=2)
    assert (cfg.layernorm_epsilon, cfg.kv_channels, cfg.num_query_groups) == (1e-5, 24, 2)
    assert kw["rotary_base"] == 5e5 and kw["share_embeddings_and_output_weights"] and kw["vocab_size"] == 131
    assert not cfg.perform_initialization and not cfg.add_bias_linear and not cfg.add_qkv_bias
    # Older configs: rope_theta at the top, rope_scaling with "type".
    _, kw = transformer_config_from_hf(_config(rope_theta=5e5, rope_scaling={**LLAMA3, "type": "llama3"}), tp=1)
    assert kw["rope_scaling"] and kw["rope_scaling_factor"] == 8.0
    cfg, _ = transformer_config_from_hf(_config(model_type="qwen2"), tp=1)
    assert cfg.add_qkv_bias and not cfg.add_bias_linear
    cfg, _ = transformer_config_from_hf(_config(model_type="qwen3"), tp=1)
    assert cfg.qk_layernorm and cfg.kv_channels == 128  # Qwen3's head_dim default
    # A sliding window caps the exact length; Qwen's only when switched on.
    _, kw = transformer_config_from_hf(_config(model_type="mistral", sliding_window=4096,
                                               max_position_embeddings=32768), tp=1)
    assert kw["max_sequence_length"] == 4096
    _, kw = transformer_config_from_hf(_config(model_type="qwen2", sliding_window=4096,
                                               max_position_embeddings=32768), tp=1)
    assert kw["max_sequence_length"] == 32768


@pytest.mark.parametrize("fields,tp,message", [
    (dict(model_type="gpt2"), 1, "model_type='gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"),
    (dict(num_attention_heads=6, num_key_value_heads=6), 4, "does not divide num_attention_heads=6"),
    (dict(num_key_value_heads=1), 2, "does not divide num_query_groups=1"),
    (dict(intermediate_size=98, num_key_value_heads=4), 4, "does not divide ffn_hidden_size=98"),
    (dict(hidden_act="gelu"), 1, "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), 1, "rope_type='yarn'"),
    (dict(rope_parameters={**LLAMA3, "low_freq_factor": 2.0}), 1, "low_freq_factor=2.0"),
    (dict(quantization_config={"quant_method": "gptq"}), 1, "quantization_config"),
])
def test_config_refused(fields, tp, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        transformer_config_from_hf(_config(**fields), tp=tp)


def test_bad_files(models, tmp_path):
    dirs, _ = models
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        SafetensorsCheckpoint(tmp_path)
    data = (Path(dirs["llama"]) / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    index = json.loads((Path(dirs["qwen2"]) / "model.safetensors.index.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    missing = sorted(set(index["weight_map"].values()))[0]
    with pytest.raises(FileNotFoundError, match=f"{missing}: listed in model.safetensors.index.json but missing"):
        SafetensorsCheckpoint(tmp_path)
    ckpt = SafetensorsCheckpoint(dirs["llama"])
    with pytest.raises(ValueError, match="tensor 'model.layers.9.mlp.up_proj.weight' is missing"):
        ckpt.slice("model.layers.9.mlp.up_proj.weight")
