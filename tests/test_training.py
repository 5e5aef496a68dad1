"""The training engine: layouts agree with one process, resume, loss masking, flags.

Tolerance for layouts against one process (fp32, dropout 0): per-step losses and gradient
norms within 1e-5 relative, adapters within 1e-3 of their largest entry: only the order of
floating-point reductions differs between layouts, but Adam divides by the root of the
second moment, so where a gradient is exactly zero in one run (A's, while B is still zero)
and reduction noise of ~1e-12 in another, the noise becomes an update of up to ~1e-4 x lr.
The gradient norms matter: Adam's update barely depends on the gradient's scale.
"""

import argparse
from pathlib import Path

import pytest
import torch

from dist import run_ranks

STEPS = 3
#: (TP, PP, sequence parallel) on 4 ranks: 2x1x2, 1x2x2, 2x2x1, and 2x2x1 with sequence parallelism.
LAYOUTS = [(2, 1, False), (1, 2, False), (2, 2, False), (2, 2, True)]


def _options(save, tp=1, pp=1, sp=False, **kw):
    from megatron_lora.runtime.training import FinetuneOptions

    base = dict(tiny=True, tp=tp, pp=pp, sequence_parallel=sp, train_iters=STEPS, micro_batch_size=2,
                global_batch_size=8, seq_length=16, lr=1e-2, lr_warmup_iters=1, eval_interval=100, eval_iters=1,
                target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"], save=str(save), seed=7)
    return FinetuneOptions(**{**base, **kw})


def _grad_norms(log) -> list:
    import json

    return [r["grad_norm"] for r in map(json.loads, Path(log).read_text().splitlines()) if "grad_norm" in r]


def _full_adapter(directory) -> dict:
    from megatron_lora.formats.checkpoint import ShardReader

    reader = ShardReader(directory)
    return {k: reader.full(k) for k in reader.keys()}


def _single_body(rank, world, root):
    """One process: the reference run (checkpoint at step 2), and loss masking."""
    from megatron_lora.runtime.training import finetune

    log = Path(root) / "single.jsonl"
    result = finetune(_options(Path(root) / "single", save_interval=2, keep_checkpoints=5, log_jsonl=str(log)))
    return {"losses": result.losses, "grad_norms": _grad_norms(log), "eval": (result.start_loss, result.final_loss),
            "adapter": _full_adapter(result.adapter), "masking": _masking(),
            "fallback": _fallback(root), "packing": _packing(_packing_base(root))}


def _packing_base(root) -> Path:
    """The tiny base of the packing checks, written once (by the single process)."""
    from megatron_lora.runtime.training import write_tiny_base

    base = Path(root) / "packing-base"
    write_tiny_base(base, 1)
    return base


def _packing(base, **layout):
    """Two examples packed into one sequence (positions restart, block-diagonal mask) give
    the evaluation loss of the two unpacked on ``base``; without the mask they do not.
    ``layout``: :func:`_options`' tp / pp / sp of the current process groups."""
    from megatron_lora.config import LoraConfig
    from megatron_lora.runtime.data import packed_attention_mask
    from megatron_lora.runtime.engine import Engine, EngineSettings
    from megatron_lora.model.lora import apply_lora
    from megatron_lora.runtime.training import load_base

    def example(start, n, pad):
        ids = (start + torch.arange(n + 1)) % 256
        mask = torch.ones(n)
        return {"tokens": torch.cat([ids[:-1], torch.zeros(pad, dtype=torch.long)]),
                "labels": torch.cat([ids[1:], torch.zeros(pad, dtype=torch.long)]),
                "loss_mask": torch.cat([mask, torch.zeros(pad)]),
                "position_ids": torch.cat([torch.arange(n), torch.arange(pad)]),
                "document_ids": torch.cat([torch.zeros(n, dtype=torch.long), -torch.ones(pad, dtype=torch.long)])}

    a, b = example(3, 10, 6), example(100, 6, 10)
    packed = {k: torch.cat([a[k][:10], b[k][:6]]) for k in a}
    packed["document_ids"] = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(6, dtype=torch.long)])
    dp = torch.distributed.get_world_size() // (layout.get("tp", 1) * layout.get("pp", 1))
    settings = EngineSettings(micro_batch_size=1, global_batch_size=dp, seq_length=16, train_iters=1, lr=1e-3)
    model = load_base(base, _options("unused", **layout))
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False), seed=1)
    losses = {}
    for name, data, mask in (("unpacked", [a, b], packed_attention_mask), ("packed", [packed], packed_attention_mask),
                             ("packed-causal-only", [packed], None)):
        losses[name] = Engine(model, model, settings, data, data, mask).evaluate()
    return losses


def _fallback(root):
    """A final save that fails (a full disk, say) lands in a fallback directory instead."""
    from megatron_lora.runtime.training import _save_with_fallback

    tried = []

    def write(directory):
        tried.append(str(directory))
        if len(tried) == 1:
            raise OSError("No space left on device")
        Path(directory).mkdir(parents=True)

    got = _save_with_fallback(write, Path(root) / "full" / "adapter")
    return {"tried": tried, "got": str(got), "exists": got.is_dir()}


def _masking():
    """One step on the tiny task with a prompt label (loss_mask 0) changed, and with a
    completion label changed: the first changes neither loss nor update, the second both."""
    from megatron_lora.runtime.engine import Engine
    from megatron_lora.runtime.tiny_task import counting_datasets
    from megatron_lora.runtime.training import load_base, write_tiny_base
    from megatron_lora.model.lora import apply_lora
    from megatron_lora.config import LoraConfig
    import tempfile

    class Relabel:
        def __init__(self, data, position):
            self.data, self.position = data, position

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            s = dict(self.data[i])
            if self.position is not None:
                s["labels"] = s["labels"].clone()
                s["labels"][self.position] = (s["labels"][self.position] + 5) % 256
            return s

    opts = _options("unused")
    with tempfile.TemporaryDirectory() as d:
        write_tiny_base(Path(d) / "base", opts.seed)
        out = {}
        for position in (None, 0, 10):
            model = load_base(Path(d) / "base", opts)
            apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]), seed=1)
            train, _ = counting_datasets(opts.seq_length, 256, opts.seed)
            assert train[0]["loss_mask"][0] == 0 and train[0]["loss_mask"][10] == 1
            engine = Engine(model, model, opts.settings(), Relabel(train, position))
            engine.train_step()
            loss = engine.train_step().loss  # a loss after an update: both must match
            out[position] = (loss, [p.detach().clone() for p in model.parameters() if p.requires_grad])
    return out


def _group_body(rank, world, root):
    """4 ranks: every layout from scratch, a resume at the same layout, and a resume of the
    single process's step-2 checkpoint at DP=4."""
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.runtime.training import finetune

    root = Path(root)
    out = {}
    for tp, pp, sp in LAYOUTS:
        name = f"run{tp}{pp}{'sp' if sp else ''}"
        log = root / f"{name}.jsonl"
        result = finetune(_options(root / name, tp, pp, sp, save_interval=2, keep_checkpoints=5, log_jsonl=str(log)))
        out[(tp, pp, sp)] = {"losses": result.losses, "grad_norms": _grad_norms(log) if rank == 0 else None,
                             "adapter": _full_adapter(result.adapter) if rank == 0 else None}
    # Packing under sequence parallelism (the sequence split over TP, the mask whole).
    init_distributed(2)
    out["packing_sp"] = _packing(root / "packing-base", tp=2, sp=True)
    # Resume the 2x1x2 run from its step-2 checkpoint: the last step again, bitwise.
    save = root / "run21"
    _point_latest(save, 2)
    out["resumed"] = finetune(_options(save, 2, 1, load=str(save))).losses
    # The single process's step-2 checkpoint at TP=1 PP=1 DP=4.
    single = root / "single"
    _point_latest(single, 2)
    out["dp4"] = finetune(_options(single, load=str(single))).losses
    return out


def _point_latest(save, step):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        (save / "latest").write_text(f"iter_{step:07d}\n")
    dist.barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    single = run_ranks(_single_body, 1, str(root))[0]
    group = run_ranks(_group_body, 4, str(root))
    return single, group


def test_layouts_match_one_process(runs):
    single, group = runs
    ref = torch.tensor(single["losses"], dtype=torch.float64)
    assert len(ref) == STEPS and single["eval"][1] < single["eval"][0] - 0.1  # it learns
    for layout in LAYOUTS:
        got = torch.tensor(group[0][layout]["losses"], dtype=torch.float64)
        assert torch.allclose(got, ref, rtol=1e-5, atol=0), (layout, got, ref)
        norms = torch.tensor(group[0][layout]["grad_norms"], dtype=torch.float64)
        ref_norms = torch.tensor(single["grad_norms"], dtype=torch.float64)
        assert len(ref_norms) == STEPS and torch.allclose(norms, ref_norms, rtol=1e-5, atol=0), (layout, norms)
        for rank in range(4):  # every rank reports the same losses
            assert group[rank][layout]["losses"] == group[0][layout]["losses"], (layout, rank)
        adapter = group[0][layout]["adapter"]
        assert adapter.keys() == single["adapter"].keys()
        for k, v in single["adapter"].items():
            scale = v.abs().max().item()
            assert scale > 0, k  # every factor trained (B starts at zero)
            assert (adapter[k] - v).abs().max().item() <= 1e-3 * scale, (layout, k)


def test_resume(runs):
    single, group = runs
    # Same layout: the uninterrupted run's last step, bitwise.
    assert group[0]["resumed"] == group[0][(2, 1, False)]["losses"][2:]
    # Another DP size: the single process's last step, to reduction-order tolerance.
    assert len(group[0]["dp4"]) == 1
    assert abs(group[0]["dp4"][0] - single["losses"][2]) <= 1e-5 * abs(single["losses"][2])


def test_prompt_labels_carry_no_loss(runs):
    single, _ = runs
    masking = single["masking"]
    plain, prompt, completion = masking[None], masking[0], masking[10]
    assert prompt[0] == plain[0] and all(torch.equal(a, b) for a, b in zip(prompt[1], plain[1]))
    assert completion[0] != plain[0] and not all(torch.equal(a, b) for a, b in zip(completion[1], plain[1]))


def test_failed_final_save_falls_back(runs):
    fallback = runs[0]["fallback"]
    assert len(fallback["tried"]) == 2 and fallback["tried"][1] == fallback["got"]
    assert fallback["exists"] and "full" not in fallback["got"]


def test_packing_equals_unpacked(runs):
    for losses in (runs[0]["packing"], runs[1][0]["packing_sp"]):
        assert abs(losses["packed"] - losses["unpacked"]) <= 1e-5 * losses["unpacked"], losses
        assert abs(losses["packed-causal-only"] - losses["unpacked"]) > 1e-3, losses


# -- flags (no ranks) ------------------------------------------------------------------------------
class _Parsed(Exception):
    pass


def _script_parsers(monkeypatch):
    """The parser of every script in scripts/ (caught at its parse_args) and of the
    megatron-lora console command."""
    import runpy

    from megatron_lora.cli.main import build_parser

    parsers = [build_parser()]

    def catch(self, *args, **kwargs):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    scripts = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))
    assert len(scripts) >= 4
    for script in scripts:
        monkeypatch.setattr("sys.argv", [str(script)])
        with pytest.raises(_Parsed):
            runpy.run_path(str(script), run_name="__main__")
    return parsers


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in parser._actions:
        out.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _flags(sub)
    return out


def test_no_flag_is_a_prefix_of_a_torchrun_option(monkeypatch):
    from torch.distributed.run import get_args_parser

    torchrun = _flags(get_args_parser())
    assert "--rdzv-backend" in torchrun and "--log-dir" in torchrun
    for parser in _script_parsers(monkeypatch):
        for flag in _flags(parser) - {"--help"}:
            clash = [t for t in torchrun if t.startswith(flag)]
            assert not clash, f"{parser.prog}: {flag} is a prefix of torchrun's {clash}"


def test_flags_and_defaults():
    from megatron_lora.cli.finetune import parse_options

    o = parse_options(["--tiny", "--tp", "2", "--pp", "2", "--steps", "5", "--lora-r", "4"])
    assert (o.tp, o.pp, o.train_iters, o.lora_r, o.seq_length, o.lr) == (2, 2, 5, 4, 32, 3e-3)
    o = parse_options(["--base", "B", "--data", "D", "--tensor-model-parallel-size", "2",
                       "--pipeline-model-parallel-size", "1", "--train-iters", "9"])
    assert (o.tp, o.train_iters, o.seq_length, o.lr, o.lr_decay_style, o.keep_checkpoints) == \
        (2, 9, 1024, 2e-4, "linear", 2)
    with pytest.raises(SystemExit):
        parse_options(["--tiny", "--lora"])  # no abbreviations
    with pytest.raises(ValueError, match="--data"):
        parse_options(["--base", "B"])
    with pytest.raises(ValueError, match="--xlora"):
        parse_options(["--tiny", "--xlora", "--pp", "2"])


def test_outputs_are_checked_before_training(tmp_path):
    from megatron_lora.runtime.training import check_outputs

    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="--save: .* is not a directory"):
        check_outputs(_options(tmp_path / "file" / "save"))
    with pytest.raises(ValueError, match="not our checkpoints"):
        check_outputs(_options(tmp_path / "foreign"))
    with pytest.raises(FileExistsError, match="--export-peft: .* already exists"):
        check_outputs(_options(tmp_path / "new", export_peft=str(tmp_path / "foreign")))
    with pytest.raises(NotADirectoryError, match="--log-jsonl: .* is not a directory"):
        check_outputs(_options(tmp_path / "new", log_jsonl=str(tmp_path / "file" / "log.jsonl")))
    (tmp_path / "done" / "iter_0000003").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        check_outputs(_options(tmp_path / "done"))
    check_outputs(_options(tmp_path / "done", load=str(tmp_path / "done")))
    # --load equal to --save may hold no checkpoint yet (the run starts at step 0); another may not.
    check_outputs(_options(tmp_path / "fresh", load=str(tmp_path / "fresh")))
    with pytest.raises(ValueError, match="--load .* is not a directory"):
        check_outputs(_options(tmp_path / "fresh", load=str(tmp_path / "elsewhere")))
