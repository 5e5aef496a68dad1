"""The user-facing entry points on what DoRA, tied output-layer LoRA and MoE LoRA added.

One spawned 2-rank group runs the commands as a user would (``megatron-lora finetune`` through
the CLI parser, and ``generate``'s own function), then this process checks them against HF +
PEFT 0.21.2 and runs ``inspect`` / ``convert --verify`` on every directory they wrote:

1. ``finetune`` on a tiny random Qwen3-MoE at EP=2 with attention, expert and router targets and
   ``--export-peft``: the export (PEFT's fused layout, the default) loads in PEFT and gives the
   trained adapter's logits; an export PEFT would refuse (dropout on fused experts) is refused
   before the first step, and ``--moe-layout per-expert`` exports transformers 4's layout.
2. ``finetune`` at TP=2 on a tiny Llama with tied embeddings: ``lm_head`` as a separate adapter,
   and ``--ensure-weight-tying`` with ``embed_tokens`` + ``lm_head`` (one adapter, transposed for
   lm_head): trained, checkpointed, resumed (the resumed run's losses and adapter equal the
   uninterrupted run's, bitwise), exported to PEFT with equal logits and greedy tokens.
3. ``generate`` with a PEFT-saved DoRA adapter (non-zero B; the seven projections, embed_tokens
   and lm_head over a vocabulary padded at TP=2) at TP=1 and TP=2: HF + PEFT's prompt logits and
   greedy tokens.
4. ``finetune --xlora`` on the MoE base refuses experts on MoE experts (X-LoRA does not mix
   them), and the parameter report finetune prints counts every parameter once at any TP x EP x
   expert TP.

Tolerance: max |diff| <= 1e-5 x max |logit| (fp32). MoE prompts avoid near-tied router scores
(both sides must route the same tokens), so only the MoE prompt's logits are compared.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_lora.formats.checkpoint import ShardReader

from dist import run_ranks
from oracle import TOL, save_random_peft_lora
from test_moe_import import _prompt, tiny_qwen3_moe

PROMPT = [3, 17, 42, 99, 5, 64, 120, 8, 0, 31]
NEW = 5
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Common finetune flags: a few steps of the synthetic task on an HF base.
TRAIN = ["--tiny", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
         "--seed", "5"]
MOE_TARGETS = ["q_proj", "gate_proj", "up_proj", "down_proj", "gate"]
#: Tied-base runs: label -> (target flags, steps).
TIED = {"lm_head": (["--target-modules", "q_proj", "lm_head"], 2),
        "ewt": (["--target-modules", "embed_tokens", "lm_head", "--ensure-weight-tying"], 4)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("entry_points")
    torch.manual_seed(0)
    tiny_qwen3_moe().save_pretrained(root / "moe")
    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, tie_word_embeddings=True, **llama)).save_pretrained(root / "tied")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=127, **llama)).eval()  # padded to 128 at TP=2
    hf.save_pretrained(root / "llama")
    save_random_peft_lora(hf, root / "dora", 3, 0.3, r=4, lora_alpha=8, use_dora=True,
                          target_modules=[*PROJECTIONS, "embed_tokens", "lm_head"])
    return root


def _cli(*argv: str) -> int:
    from megatron_lora.cli.main import main

    return main(list(argv))


def _refused(*argv: str) -> tuple[int, str]:
    """Exit status and error line (rank 0) of a command that should refuse its input."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        return _cli(*argv), err.getvalue()


def _moe_prompt(base: Path, peft_dir: Path) -> list[int]:
    """A prompt whose router scores have no near-ties on the base with the adapter merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return _prompt({"merged": PeftModel.from_pretrained(hf, str(peft_dir)).merge_and_unload().eval()})


def _group(rank, world, root):
    from megatron_lora.cli.generate import generate_from_dirs

    root = Path(root)
    out = {}
    moe = ["finetune", *TRAIN, "--base", str(root / "moe"), "--expert-model-parallel-size", "2", "--steps", "2",
           "--target-modules", *MOE_TARGETS]
    out["moe"] = _cli(*moe, "--save", str(root / "moe_run"), "--export-peft", str(root / "moe_peft"))
    out["moe_dropout"] = _refused(*moe, "--lora-dropout", "0.1", "--save", str(root / "moe_dropout"),
                                  "--export-peft", str(root / "moe_dropout_peft"))
    out["moe_per_expert"] = _cli(*moe, "--save", str(root / "moe_run_v4"), "--export-peft", str(root / "moe_peft_v4"),
                                 "--moe-layout", "per-expert")
    for label, (targets, steps) in TIED.items():
        out[label] = _cli("finetune", *TRAIN, "--base", str(root / "tied"), "--tp", "2", "--steps", str(steps), *targets,
                          "--save", str(root / f"{label}_run"), "--save-interval", "2",
                          "--log-jsonl", str(root / f"{label}.jsonl"), "--export-peft", str(root / f"{label}_peft"))
    # The tied adapter at the other layouts of 2 ranks: DP=2 and PP=2.
    for name, layout in (("ewt_dp2", ["--tp", "1"]), ("ewt_pp2", ["--pp", "2"])):
        out[name] = _cli("finetune", *TRAIN, "--base", str(root / "tied"), *layout, "--steps", "4", *TIED["ewt"][0],
                         "--save", str(root / f"{name}_run"), "--log-jsonl", str(root / f"{name}.jsonl"))
    # Resume the tied run from its step-2 checkpoint, in a copy.
    if rank == 0:
        resumed = root / "ewt_resumed"
        shutil.copytree(root / "ewt_run", resumed, ignore=shutil.ignore_patterns("iter_0000004", "adapter"))
        (resumed / "latest").write_text("iter_0000002\n")
    torch.distributed.barrier()
    out["ewt_resumed"] = _cli("finetune", *TRAIN, "--base", str(root / "tied"), "--tp", "2", "--steps", "4",
                              *TIED["ewt"][0], "--save", str(root / "ewt_resumed"), "--load", str(root / "ewt_resumed"),
                              "--log-jsonl", str(root / "ewt_resumed.jsonl"))
    # X-LoRA does not mix LoRA on MoE experts: refused before training, with and without given experts.
    xlora = ["finetune", *TRAIN, "--base", str(root / "moe"), "--expert-model-parallel-size", "2", "--steps", "1", "--xlora"]
    out["xlora_random"] = _refused(*xlora, "--save", str(root / "xlora_random"))
    out["xlora_given"] = _refused(*xlora, "--xlora-experts", f"{root / 'moe_peft'},{root / 'ewt_peft'}",
                                  "--save", str(root / "xlora_given"))
    out["counts"] = _expert_counts(root / "moe")
    # generate (the entry point's function) with each adapter.
    moe_prompt = _moe_prompt(root / "moe", root / "moe_peft")
    jobs = {"moe": ("moe", root / "moe_run" / "adapter", moe_prompt, 1, 2),
            "moe_v4": ("moe", root / "moe_run_v4" / "adapter", moe_prompt, 1, 2),
            "lm_head": ("tied", root / "lm_head_run" / "adapter", PROMPT, 2, 1),
            "ewt": ("tied", root / "ewt_run" / "adapter", PROMPT, 2, 1),
            "dora_tp1": ("llama", root / "dora", PROMPT, 1, 1),
            "dora_tp2": ("llama", root / "dora", PROMPT, 2, 1)}
    for name, (base, adapter, prompt, tp, ep) in jobs.items():
        tokens = generate_from_dirs(str(root / base), input_ids=",".join(map(str, prompt)), adapter=str(adapter), tp=tp,
                                    expert_model_parallel_size=ep, max_new_tokens=NEW,
                                    logits_out=str(root / f"{name}_logits.safetensors"))
        out[f"gen_{name}"] = (prompt, tokens)
    return out


#: (TP, EP, expert TP) layouts of 2 ranks whose parameter counts must agree.
COUNT_LAYOUTS = ((1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 1))


def _expert_counts(base: Path) -> dict:
    """finetune's parameter-report counts with expert, router and attention LoRA at each layout."""
    from megatron_lora import LoraConfig, apply_lora, trainable_parameters
    from megatron_lora.hf.importer import load_hf_base
    from megatron_lora.runtime.distributed import init_distributed

    out = {}
    for tp, ep, etp in COUNT_LAYOUTS:
        init_distributed(tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
        model, _ = load_hf_base(base)
        out[(tp, ep, etp)] = trainable_parameters(apply_lora(model, LoraConfig(r=8, target_modules=MOE_TARGETS)))
    return out


@pytest.fixture(scope="module")
def runs(bases):
    return run_ranks(_group, 2, str(bases))


def _reference(base: Path, peft_dir: Path, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """HF + PEFT's prompt logits and greedy tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0]
        tokens = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    return logits, tokens


def _check(root: Path, runs, name: str, base: str, peft_dir: Path, tokens: bool = True) -> None:
    prompt, got_tokens = runs[0][f"gen_{name}"]
    assert runs[1][f"gen_{name}"] == (prompt, got_tokens), name  # every rank generates the same
    ref, ref_tokens = _reference(root / base, peft_dir, prompt)
    got = load_file(str(root / f"{name}_logits.safetensors"))["logits"]
    assert got.shape == ref.shape, name
    assert (got - ref).abs().max().item() <= TOL * ref.abs().max().item(), name
    if tokens:
        assert got_tokens == ref_tokens, (name, got_tokens, ref_tokens)


def _inspect(capsys, directory: Path) -> str:
    capsys.readouterr()
    assert _cli("inspect", str(directory)) == 0
    return capsys.readouterr().out


def _verify(capsys, src: Path, dst: Path, to: str, base: Path) -> None:
    capsys.readouterr()
    assert _cli("convert", str(src), str(dst), "--to", to, "--base", str(base), "--verify") == 0
    assert "verify: max |logit diff|" in capsys.readouterr().out


def test_moe_finetune_exports_to_peft(bases, runs, capsys):
    for rank in runs:
        assert (rank["moe"], rank["moe_per_expert"]) == (0, 0)
    _check(bases, runs, "moe", "moe", bases / "moe_peft", tokens=False)
    config = json.loads((bases / "moe_peft" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]
    # transformers 4's per-expert modules, which PEFT converts on loading
    _check(bases, runs, "moe_v4", "moe", bases / "moe_peft_v4", tokens=False)
    v4 = load_file(str(bases / "moe_peft_v4" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in v4
    # Dropout on fused experts: refused before the first step (nothing saved), naming the flag.
    assert [rank["moe_dropout"][0] for rank in runs] == [1, 1]
    assert "--export-peft" in runs[0]["moe_dropout"][1] and "lora_dropout=0.1" in runs[0]["moe_dropout"][1]
    assert not (bases / "moe_dropout").exists()
    for d in (bases / "moe_run" / "adapter", bases / "moe_peft"):
        out = _inspect(capsys, d)
        assert "router       layer 0; layer 1  r [8]  lora_alpha [16.0]" in out, out
        assert "q_proj       layers 0-1  r [8]" in out, out
    assert "gate_proj    layer 0 experts 0-3; layer 1 experts 0-3" in _inspect(capsys, bases / "moe_run" / "adapter")
    _verify(capsys, bases / "moe_run" / "adapter", bases / "moe_verify_peft", "peft", bases / "moe")
    _verify(capsys, bases / "moe_peft", bases / "moe_verify_meg", "megatron", bases / "moe")


def test_tied_finetune_resume_and_export(bases, runs, capsys):
    for label in TIED:
        assert [rank[label] for rank in runs] == [0, 0], label
        _check(bases, runs, label, "tied", bases / f"{label}_peft")
    assert [rank["ewt_resumed"] for rank in runs] == [0, 0]
    # The lm_head adapter has tensors of its own; the tied one is the embedding's, transposed.
    lm = load_file(str(bases / "lm_head_peft" / "adapter_model.safetensors"))
    assert lm["base_model.model.lm_head.lora_B.weight"].abs().max() > 0
    tied = load_file(str(bases / "ewt_peft" / "adapter_model.safetensors"))
    embed, head = "base_model.model.model.embed_tokens.lora_embedding_", "base_model.model.lm_head.lora_"
    assert len(tied) == 4 and tied[f"{embed}A"].abs().max() > 0 and tied[f"{embed}B"].abs().max() > 0
    assert torch.equal(tied[f"{head}A.weight"], tied[f"{embed}B"].t()) and torch.equal(tied[f"{head}B.weight"], tied[f"{embed}A"].t())
    assert json.loads((bases / "ewt_peft" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    # Resumed at step 2: steps 3 and 4 and the final adapter equal the uninterrupted run's, bitwise.
    whole = [json.loads(line) for line in (bases / "ewt.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (bases / "ewt_resumed.jsonl").read_text().splitlines()]
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
    assert sorted(losses(resumed)) == [3, 4]
    assert losses(resumed) == {k: v for k, v in losses(whole).items() if k > 2}
    # The same losses at DP=2 and PP=2 (the tied adapter's gradient summed over the embedding group).
    for name in ("ewt_dp2", "ewt_pp2"):
        assert [rank[name] for rank in runs] == [0, 0], name
        other = losses([json.loads(line) for line in (bases / f"{name}.jsonl").read_text().splitlines()])
        assert other.keys() == losses(whole).keys()
        assert all(abs(other[k] - v) <= 1e-5 * v for k, v in losses(whole).items()), (name, other, losses(whole))
    a, b = (ShardReader(bases / run / "adapter") for run in ("ewt_run", "ewt_resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a.full(k), b.full(k)) for k in a.keys())
    out = _inspect(capsys, bases / "ewt_run" / "adapter")
    assert "tied:         output_layer uses embedding.word_embeddings's adapter" in out, out
    assert "lm_head      (no layer)  r [8]" in _inspect(capsys, bases / "lm_head_run" / "adapter")
    for label in TIED:
        _verify(capsys, bases / f"{label}_run" / "adapter", bases / f"{label}_verify", "peft", bases / "tied")
        _verify(capsys, bases / f"{label}_peft", bases / f"{label}_verify_meg", "megatron", bases / "tied")


def test_generate_with_dora_matches_hf_peft(bases, runs, capsys):
    for name in ("dora_tp1", "dora_tp2"):
        _check(bases, runs, name, "llama", bases / "dora")
    assert "use_dora:     True" in _inspect(capsys, bases / "dora")
    _verify(capsys, bases / "dora", bases / "dora_meg", "megatron", bases / "llama")
    assert "use_dora:     True" in _inspect(capsys, bases / "dora_meg")


def test_xlora_refuses_lora_on_moe_experts(runs):
    for label, words in (("xlora_random", "needs --xlora-experts"),
                         ("xlora_given", "moe_peft: an X-LoRA expert adapting MoE experts or routers")):
        assert [rank[label][0] for rank in runs] == [1, 1], label
        assert words in runs[0][label][1], runs[0][label][1]


def test_parameter_counts_at_every_layout(bases, runs):
    """The report finetune prints counts every parameter once at any TP x EP x expert TP: the
    trainable ones as the adapter the MoE run saved (the same targets and rank) holds, the
    frozen ones as the HF model holds."""
    from transformers import AutoModelForCausalLM

    from megatron_lora.formats.convert import describe

    want = describe(bases / "moe_run" / "adapter")["parameters"]
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(bases / "moe")).parameters())
    for rank in runs:
        for layout, counts in rank["counts"].items():
            assert (counts["trainable"], counts["total"] - counts["trainable"]) == (want, base), (layout, counts)
    assert runs[0]["counts"][(1, 2, 1)]["local_trainable"] < want  # each rank holds half of the experts


def test_new_finetune_flags():
    from megatron_lora.cli.finetune import parse_options

    assert parse_options(["--tiny", "--ensure-weight-tying"]).ensure_weight_tying is True
    assert parse_options(["--tiny"]).ensure_weight_tying is False
    with pytest.raises(ValueError, match="--ensure-weight-tying shapes the LoRA adapter"):
        parse_options(["--tiny", "--xlora", "--ensure-weight-tying"])
    assert parse_options(["--tiny", "--export-peft", "x", "--moe-layout", "per-expert"]).moe_layout == "per-expert"
    with pytest.raises(ValueError, match="--moe-layout per-expert applies to the PEFT export"):
        parse_options(["--tiny", "--moe-layout", "per-expert"])
