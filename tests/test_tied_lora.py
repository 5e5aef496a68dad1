"""LoRA on an output layer tied to the embedding (HF ``tie_word_embeddings=True``): a separate
lm_head adapter on the shared weight, and PEFT's ``ensure_weight_tying`` (lm_head's adapter is
the embedding's transposed) against HF + PEFT at TP=1 and TP=2 (logits and LoRA gradients), at
PP=2 against PP=1 (the tied adapter's gradient summed over the embedding group), converters both
ways, dist_checkpointing with a padded vocabulary, and generation with embedding / lm_head
adapters (tied and untied bases) against HF + PEFT, KV-cached.

Tolerance: max |diff| <= 1e-5 x max |logit| (fp32), gradients relative to their own scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist import run_ranks
from oracle import TOL

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 127, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
#: label -> (target_modules, ensure_weight_tying) on the tied model.
CASES = {
    "lm_head": (["q_proj", "lm_head"], False),  # a separate adapter on the shared weight
    "both": (["embed_tokens", "lm_head"], False),  # two separate adapters
    "tied": (["embed_tokens", "lm_head"], True),  # PEFT ties lm_head's adapter to the embedding's
    "tied_lm_head": (["lm_head", "down_proj"], True),  # ... also when only lm_head is named
}
PROMPT = [3, 17, 42, 99, 5, 64, 120, 8, 0, 31]
NEW = 5
#: Generation adapters: label -> (tied base, ensure_weight_tying); targets embed_tokens + lm_head.
GEN = {"untied": (False, False), "tied": (True, False), "tied_ewt": (True, True)}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _build(tp=1, pp=1, first=True, last=True, vocab=128):
    from megatron_lora.model.gpt import build_gpt, gpt_config
    from megatron_lora.parallel.cpu import cuda_on_cpu

    torch.manual_seed(7)
    cfg = gpt_config(2, 64, 8, 96, num_query_groups=2, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    with cuda_on_cpu():  # megatron-core moves the last stage's copy of a tied weight with .cuda()
        return build_gpt(cfg, vocab, max_sequence_length=32, share_embeddings_and_output_weights=True,
                         pre_process=first, post_process=last)


def _config(label, **kw):
    from megatron_lora import LoraConfig

    targets, ewt = CASES[label]
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, ensure_weight_tying=ewt, **kw)


def _logits(model, ids=IDS):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_lora.model.gpt import positions_for

    return gather_from_tensor_model_parallel_region(model(ids, positions_for(ids), None))


def _full_factors(model, value) -> dict:
    """HF module name -> full (value(A), value(B)) of the adapters with tensors of their own."""
    from megatron_lora.hf.layout import hf_module_name
    from megatron_lora.model.lora import iter_linear_sites
    from oracle import gather_rows

    out = {}
    for site in iter_linear_sites(model):
        m = site.module
        if "default" not in getattr(m, "lora_A", {}):
            continue
        for seg in m.lora_specs["default"].segments:
            a, b = value(m.lora_A["default"][seg.name]), value(m.lora_B["default"][seg.name])
            a, b = (a, gather_rows(b, 0)) if m.parallel_mode == "column" else (gather_rows(a, 1), b)
            name = {"output_layer": "lm_head", "word_embeddings": "model.embed_tokens"}.get(site.kind)
            out[name or hf_module_name(site.layer, seg.name)] = (a, b)
    return out


def _peft_model(hf, targets, ewt, tensors=None):
    """PEFT LoRA on ``hf`` (its own random factors, or ``tensors``: HF name -> full (A, B))."""
    from peft import LoraConfig, get_peft_model

    from oracle import peft_factors

    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                       ensure_weight_tying=ewt))
    modules = dict(pm.base_model.model.named_modules())
    with torch.no_grad():
        for name, (a, b) in (tensors or {}).items():
            pa, pb = peft_factors(modules[name])
            pa.copy_(a)
            pb.copy_(b)
    return pm.eval(), modules


def _on_rank0(fn):
    """Run ``fn`` on rank 0 while the others wait; re-raise its failure after the barrier."""
    import torch.distributed as dist

    failure, result = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks are released
            failure = e
    dist.barrier()
    if failure is not None:
        raise failure
    return result


def _against_peft(world, tmp, label):
    """Our tied model with ``label``'s adapter vs HF + PEFT; checkpoints and converters."""
    from peft import PeftModel

    from megatron_lora import apply_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
    from megatron_lora.formats.convert import convert, describe
    from megatron_lora.model.adapters import model_facts
    from oracle import hf_llama, peft_factors

    targets, ewt = CASES[label]
    out = {}
    model = apply_lora(_build(world), _config(label))
    out["own_output_params"] = sorted(n for n, _ in model.output_layer.named_parameters())
    logits = _logits(model)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weight).sum().backward()
    facts = model_facts(model)
    pm, modules = _peft_model(hf_llama(model, facts), targets, ewt, _full_factors(model, lambda p: p.detach()))
    ref = pm(IDS).logits
    (ref * weight).sum().backward()
    out["logit_err"] = _rel(logits.detach(), ref.detach())
    ours = _full_factors(model, lambda p: p.grad)
    theirs = {n: tuple(p.grad for p in peft_factors(modules[n])) for n in ours}
    if ewt:  # PEFT's tied lm_head factors are leaves of their own: their gradients add up in ours
        la, lb = peft_factors(modules["lm_head"])
        ea, eb = theirs["model.embed_tokens"]
        theirs["model.embed_tokens"] = (ea + lb.grad.t(), eb + la.grad.t())
        out["peft_tied"] = la.data_ptr() == peft_factors(modules["model.embed_tokens"])[1].data_ptr()
    out["grad_names"] = sorted(ours)
    out["grad_err"] = max(max(_rel(ga, ta), _rel(gb, tb)) for (ga, gb), (ta, tb) in
                          ((ours[n], theirs[n]) for n in ours))

    d = f"{tmp}/{label}{world}"
    save_adapter(model, f"{d}_meg", _config(label))
    hf_base = hf_llama(model, facts)  # gathers over TP: every rank
    pm.save_pretrained(f"{d}_native")  # PEFT's own file (base_layer weights, tied lm_head tensors)

    def convert_both_ways():
        res = {}
        convert(f"{d}_meg", f"{d}_peft", "peft", progress=False)
        loaded = PeftModel.from_pretrained(hf_base, f"{d}_peft").eval()
        with torch.no_grad():
            res["peft_load_err"] = _rel(loaded(IDS).logits, logits.detach())
        res["peft_config"] = json.loads(Path(f"{d}_peft/adapter_config.json").read_text())
        res["peft_keys"] = sorted(load_file(f"{d}_peft/adapter_model.safetensors"))
        res["describe"] = describe(f"{d}_meg")
        res["meg_config"] = json.loads(Path(f"{d}_meg/adapter_config.json").read_text())
        # PEFT's own file -> ours -> PEFT: the LoRA tensors come back bit for bit.
        convert(f"{d}_native", f"{d}_native_meg", "megatron", facts=facts, tp=world, progress=False)
        convert(f"{d}_native_meg", f"{d}_native_back", "peft", progress=False)
        native = {k: v for k, v in load_file(f"{d}_native/adapter_model.safetensors").items() if "base_layer" not in k}
        back = load_file(f"{d}_native_back/adapter_model.safetensors")
        res["native_round_trip"] = native.keys() == back.keys() and all(torch.equal(native[k], back[k]) for k in native)
        res["native_meg_modules"] = json.loads(Path(f"{d}_native_meg/adapter_config.json").read_text())["modules"]
        return res

    out.update(_on_rank0(convert_both_ways) or {})
    for src in ("meg", "native"):
        fresh = _build(world)
        load_adapter(fresh, f"{d}_{src}")
        with torch.no_grad():
            reloaded = _logits(fresh)
        out[f"reload_{src}_err"] = _rel(reloaded, logits.detach())
        out[f"reload_{src}_exact"] = torch.equal(reloaded, logits.detach())
    with torch.no_grad():
        weights = {n: p.detach().clone() for n, p in fresh.named_parameters() if n.endswith(".weight")}
        try:
            merge_lora(fresh)
            out["merged_err"] = _rel(_logits(fresh), logits.detach())
            unmerge_lora(fresh)
            out["unmerge_exact"] = all(torch.equal(p, weights[n]) for n, p in fresh.named_parameters() if n in weights)
        except ValueError as e:
            out["merge_refused"] = str(e)
    return out


def _warnings(world):
    """PEFT's warnings on tied weights: on rank 0 only, one line each."""
    import warnings

    from megatron_lora import LoraConfig, apply_lora

    out = {}
    for label, kw in (("untied_targets", dict(target_modules=["lm_head"])),
                      ("ewt_without_tied_target", dict(target_modules=["q_proj"], ensure_weight_tying=True)),
                      ("none", dict(target_modules=["lm_head"], ensure_weight_tying=True))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_lora(_build(world), LoraConfig(r=2, **kw))
        out[label] = [str(w.message) for w in caught if "ensure_weight_tying" in str(w.message)]
    return out


def _pp_checks(rank, tmp):
    """PP=2 (2 ranks) against PP=1 on the same base and adapters: loss and every gradient."""
    import torch.distributed as dist

    from megatron_lora import apply_lora, init_distributed, load_adapter, save_adapter
    from megatron_lora.model.gpt import positions_for
    from megatron_lora.model.lora import allreduce_tied_adapter_grads, tied_adapter_parameters

    weight = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(0))
    out = {}
    for label in ("lm_head", "tied"):
        init_distributed(1, 1)
        ref = apply_lora(_build(), _config(label), seed=3)
        loss = (_logits(ref) * weight).sum()
        loss.backward()
        base = {n: p.detach().clone() for n, p in ref.named_parameters()}
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}

        init_distributed(1, 2)
        stage = _build(pp=2, first=rank == 0, last=rank == 1)
        offset = rank  # one layer per stage
        with torch.no_grad():
            for n, p in stage.named_parameters():
                if n.startswith("decoder.layers."):
                    i, rest = n[len("decoder.layers."):].split(".", 1)
                    n = f"decoder.layers.{int(i) + offset}.{rest}"
                p.copy_(base["embedding.word_embeddings.weight" if n == "output_layer.weight" else n])
        apply_lora(stage, _config(label), seed=3)
        ids, pos = IDS, positions_for(IDS)
        if rank == 0:
            hidden = stage(ids, pos, None)
            dist.send(hidden.detach().contiguous(), 1)
            g = torch.empty_like(hidden)
            dist.recv(g, 1)
            hidden.backward(g)
        else:
            x = torch.empty(8, 2, 64)
            dist.recv(x, 0)
            x.requires_grad_(True)
            stage.set_input_tensor(x)
            stage_loss = (_logits(stage) * weight).sum()
            stage_loss.backward()
            dist.send(x.grad.contiguous(), 0)
            out[f"{label}_loss_err"] = abs(stage_loss.item() - loss.item()) / abs(loss.item())
        names = {}  # stage parameter -> the PP=1 parameter it stands for
        for n, p in stage.named_parameters():
            if p.grad is None:
                continue
            if n.startswith("decoder.layers."):
                i, rest = n[len("decoder.layers."):].split(".", 1)
                n = f"decoder.layers.{int(i) + offset}.{rest}"
            n = n.replace("output_layer.lora_tied.default.A", "embedding.word_embeddings.lora_A.default.embed_tokens")
            n = n.replace("output_layer.lora_tied.default.B", "embedding.word_embeddings.lora_B.default.embed_tokens")
            names[n] = p
        tied_params = {n: p for n, p in names.items() if n.startswith("embedding.")}
        before = {n: p.grad.clone() for n, p in tied_params.items()}
        allreduce_tied_adapter_grads([stage])
        out[f"{label}_grad_names"] = sorted(names)
        out[f"{label}_grad_err"] = max(_rel(p.grad, grads[n]) for n, p in names.items())
        out[f"{label}_stage_only_err"] = max((_rel(before[n], grads[n]) for n in before), default=None)
        out[f"{label}_copy_equal"] = all(torch.equal(p, ref.get_parameter(n)) for n, p in names.items())
        if label == "tied":
            # The last stage's copy is saved as a replica of the first stage's tensor (as megatron-core
            # saves its copy of the embedding weight).
            sharded = stage.sharded_state_dict().get("output_layer.lora_tied.default.A")
            out["sharded"] = sharded and (sharded.key, sharded.replica_id[0], sharded.allow_shape_mismatch)
            # Pipeline stages save one checkpoint; a PP=1 model loads it with the same logits.
            save_adapter(stage, f"{tmp}/pp2_{label}", _config(label))
            # Loaded at PP=2, each stage's tied factors (the embedding's, the copy) are the saved ones.
            again = _build(pp=2, first=rank == 0, last=rank == 1)
            load_adapter(again, f"{tmp}/pp2_{label}")
            out["pp_reload_tied"] = [torch.equal(a, b) for a, b in
                                     zip(tied_adapter_parameters(again), tied_adapter_parameters(stage))]
            init_distributed(1, 1)
            fresh = _build()
            load_adapter(fresh, f"{tmp}/pp2_{label}")
            with torch.no_grad():
                out["pp_checkpoint_err"] = _rel(_logits(fresh), _logits(ref))
    out["engine"] = _engine_step(rank)
    return out


def _engine_step(rank):
    """Two optimizer steps of megatron-core's engine at PP=2 on the tied adapter: the first
    stage's adapter and the last stage's copy take the same steps."""
    import torch.distributed as dist

    from megatron_lora import apply_lora, init_distributed
    from megatron_lora.model.lora import tied_adapter_parameters
    from megatron_lora.runtime.engine import Engine, EngineSettings
    from megatron_lora.runtime.tiny_task import CountingData

    init_distributed(1, 2)
    stage = apply_lora(_build(pp=2, first=rank == 0, last=rank == 1), _config("tied"), seed=3)
    before = [p.detach().clone() for p in tied_adapter_parameters(stage)]
    engine = Engine(stage, stage, EngineSettings(micro_batch_size=1, global_batch_size=2, seq_length=8,
                                                 train_iters=2, lr=1e-2), CountingData(8, 8, 128, 0))
    losses = [engine.train_step().loss for _ in range(2)]
    after = torch.cat([p.detach().reshape(-1) for p in tied_adapter_parameters(stage)])
    both = [torch.empty_like(after) for _ in range(2)]
    dist.all_gather(both, after)
    return {"losses": losses, "copies_equal": torch.equal(both[0], both[1]),
            "moved": not torch.equal(after, torch.cat([p.reshape(-1) for p in before]))}


def _dist_checkpoint(world, tmp):
    """dist_checkpointing of an embedding + tied lm_head LoRA model with a vocabulary of 127,
    padded to 128 at TP=2: saved at TP=2, loaded at TP=1 (the next group) with the same logits."""
    from megatron.core import dist_checkpointing

    from megatron_lora import apply_lora

    model = apply_lora(_build(world, vocab=127), _config("tied"))
    with torch.no_grad():
        logits = _logits(model, IDS % 127)[..., :127]
    path = Path(tmp) / "dist_ckpt"
    if world == 2:
        _on_rank0(lambda: path.mkdir())
        dist_checkpointing.save(model.sharded_state_dict(), str(path))
        return {"logits": logits}
    target = _build(world, vocab=127)
    torch.manual_seed(99)  # another adapter: the load must overwrite it
    apply_lora(target, _config("tied"))
    target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(path)))
    with torch.no_grad():
        return {"reload_logits": _logits(target, IDS % 127)[..., :127]}


def _generation(world, gen_dir):
    """scripts/generate.py's path (KV-cached greedy decoding) with PEFT adapters on embed_tokens +
    lm_head at TP=world; on the tied adapter also the cached steps against recomputation."""
    import torch.distributed as dist

    from megatron_lora.cli.generate import generate_from_dirs
    from megatron_lora.hf.importer import eos_token_ids, load_hf_base
    from megatron_lora.model.adapters import load_adapter
    from megatron_lora.parallel.lora_layers import LoraComputeDtype, configure_lora_layers
    from megatron_lora.runtime.generation import forward_logits, generate

    out = {}
    for label in GEN:
        base, adapter = f"{gen_dir}/base_{label}", f"{gen_dir}/adapter_{label}"
        logits_file = f"{gen_dir}/logits_{label}_{world}.safetensors"
        tokens = generate_from_dirs(base, input_ids=",".join(map(str, PROMPT)), adapter=adapter, tp=world,
                                    max_new_tokens=NEW, logits_out=logits_file)
        written = load_file(logits_file)["logits"] if dist.get_rank() == 0 else None  # rank 0 writes it
        out[label] = {"tokens": tokens, "logits": written}
    base, adapter = f"{gen_dir}/base_tied_ewt", f"{gen_dir}/adapter_tied_ewt"
    model, _ = load_hf_base(base)
    load_adapter(model, adapter)
    configure_lora_layers(model, compute_dtype=LoraComputeDtype.FP32)
    cached, steps = generate(model, PROMPT, NEW, eos_token_ids(base), output_logits=True)
    full = forward_logits(model, torch.tensor([PROMPT + cached[:-1]]))[0, len(PROMPT) - 1:]
    out["cache_vs_full"] = _rel(torch.stack(steps), full)
    out["cached_tokens"] = cached
    return out


def _checks(rank, world, tmp, gen_dir):
    from megatron_lora import init_distributed

    init_distributed(world, seed=5)
    out = {label: _against_peft(world, tmp, label) for label in CASES}
    out["warnings"] = _warnings(world)
    out["dist"] = _dist_checkpoint(world, tmp)
    out["generation"] = _generation(world, gen_dir)
    if world == 2:
        out["pp"] = _pp_checks(rank, tmp)
    return out


@pytest.fixture(scope="module")
def gen_dirs(tmp_path_factory):
    """HF bases (tied and untied) with PEFT adapters on embed_tokens + lm_head, and PEFT's greedy
    tokens and prompt logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied_gen")
    ref = {}
    for label, (tied, ewt) in GEN.items():
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=tied)
        hf = LlamaForCausalLM(cfg).float().eval()
        hf.save_pretrained(root / f"base_{label}")
        torch.manual_seed(2)
        pm, _ = _peft_model(hf, ["embed_tokens", "lm_head"], ewt)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_embedding_A" in n:  # moderate deltas: well-conditioned fp32 comparisons
                    p.mul_(0.3)
        pm.save_pretrained(root / f"adapter_{label}")
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            logits = pm(input_ids=ids).logits[0]
            tokens = pm.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
        ref[label] = {"logits": logits, "tokens": tokens}
    return str(root), ref


@pytest.fixture(scope="module")
def results(tmp_path_factory, gen_dirs):
    tmp = str(tmp_path_factory.mktemp("tied"))
    return {world: run_ranks(_checks, world, tmp, gen_dirs[0]) for world in (2, 1)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("label", list(CASES))
def test_tied_output_layer_lora_matches_peft(results, world, label):
    targets, ewt = CASES[label]
    for r in results[world]:
        c = r[label]
        assert c["logit_err"] <= TOL and c["grad_err"] <= TOL, c
        tied = ewt
        # Tied: the output layer holds no factors of its own; untied: its own A and B.
        assert c["own_output_params"] == ([] if tied else ["lora_A.default.lm_head", "lora_B.default.lm_head"])
        assert ("lm_head" in c["grad_names"]) != tied and ("model.embed_tokens" in c["grad_names"]) == (label != "lm_head")
        assert c["reload_meg_exact"] and c["reload_native_err"] <= TOL, c
        if tied:
            assert c["peft_tied"] and c["merged_err"] <= TOL and c["unmerge_exact"]
        else:  # merging a separate lm_head adapter would change the shared embedding
            assert "tied" in c["merge_refused"]
    r0 = results[world][0][label]
    assert r0["peft_load_err"] <= TOL and r0["native_round_trip"]
    lm_keys = {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"}
    assert lm_keys <= set(r0["peft_keys"])
    assert r0["peft_config"]["ensure_weight_tying"] is ewt
    modules = r0["meg_config"]["modules"]
    assert ("tied" in modules["output_layer"]) == tied and r0["native_meg_modules"] == modules
    if tied:
        assert modules["output_layer"]["tied"] == "embedding.word_embeddings"
        assert r0["describe"]["tied"] == {"output_layer": "embedding.word_embeddings"}
        assert "model.embed_tokens" in r0["meg_config"]["lora_config"]["target_modules"]
        assert "lm_head" not in r0["peft_config"]["target_modules"]


@pytest.mark.parametrize("world", [1, 2])
def test_peft_warnings_on_rank0(results, world):
    w0 = results[world][0]["warnings"]
    assert len(w0["untied_targets"]) == 1 and "tie_word_embeddings=True" in w0["untied_targets"][0]
    assert len(w0["ewt_without_tied_target"]) == 1 and "no tied modules are added" in w0["ewt_without_tied_target"][0]
    assert w0["none"] == [] and all("\n" not in m for ms in w0.values() for m in ms)
    if world == 2:
        assert all(v == [] for v in results[2][1]["warnings"].values())


def test_pipeline_parallel_equals_one_stage(results):
    """PP=2: the loss and every LoRA gradient equal PP=1's; the tied adapter's gradient is the
    sum of both stages' (each stage alone is wrong), and its copies stay equal."""
    first, last = (r["pp"] for r in results[2])
    for label in ("lm_head", "tied"):
        assert last[f"{label}_loss_err"] <= TOL
        for stage in (first, last):
            assert stage[f"{label}_grad_err"] <= TOL, stage
            assert stage[f"{label}_copy_equal"]
    embedding = ["embedding.word_embeddings.lora_A.default.embed_tokens", "embedding.word_embeddings.lora_B.default.embed_tokens"]
    assert first["tied_grad_names"] == embedding and last["tied_grad_names"] == embedding  # the copy, by its source
    assert [n.split(".")[2] for n in first["lm_head_grad_names"]] == ["0", "0"]
    assert "output_layer.lora_A.default.lm_head" in last["lm_head_grad_names"]
    assert first["tied_stage_only_err"] > 1e-3 and last["tied_stage_only_err"] > 1e-3
    assert first["lm_head_stage_only_err"] is None and last["lm_head_stage_only_err"] is None
    assert last["sharded"] == ("embedding.word_embeddings.lora_A.default.embed_tokens", 1, True)
    assert first["pp_checkpoint_err"] <= TOL
    assert first["pp_reload_tied"] == [True, True] and last["pp_reload_tied"] == [True, True]
    for stage in (first, last):  # without the embedding-group sum the copies drift apart
        e = stage["engine"]
        assert e["copies_equal"] and e["moved"] and all(map(math.isfinite, e["losses"])), e


def test_dist_checkpointing_across_vocabulary_padding(results):
    saved = results[2][0]["dist"]["logits"]
    assert _rel(results[1][0]["dist"]["reload_logits"], saved) <= TOL


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("label", list(GEN))
def test_generation_matches_peft(results, gen_dirs, world, label):
    ref = gen_dirs[1][label]
    r = results[world][0]["generation"]
    assert r[label]["tokens"] == ref["tokens"]
    assert _rel(r[label]["logits"], ref["logits"]) <= TOL
    assert r["cache_vs_full"] <= TOL and r["cached_tokens"] == gen_dirs[1]["tied_ewt"]["tokens"]
