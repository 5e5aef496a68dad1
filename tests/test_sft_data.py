"""SFT data (megatron_lora.runtime.data): formats, loss spans, EOS, truncation, errors, order, packing."""

import json

import pytest
import torch

from dist import run_ranks
from megatron_lora.runtime.data import (
    batch_indices,
    load_sft_samples,
    packed_attention_mask,
    rank_micro_batches,
    split_eval,
)

# A ChatML template like SmolLM2's: a default system turn, "<|im_start|>role\n...<|im_end|>\n".
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "</s>"]


def _tokenizer(directory, eos="<|im_end|>", chat_template=CHATML, wrap=False):
    """A byte-level tokenizer (one token per byte, 259 ids) saved to and loaded from a directory,
    as a job loads the tokenizer of --base. ``wrap``: it adds BOS and EOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    if wrap:
        tok.post_processor = processors.TemplateProcessing(
            single=f"<|im_start|> $A {eos}", special_tokens=[(t, tok.token_to_id(t)) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, chat_template=chat_template)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _examples(samples):
    """Per example: (input text, text of the labels with loss), in sample order."""
    out = []
    for s in samples:
        for d in range(int(s["document_ids"].max()) + 1):
            at = s["document_ids"] == d
            out.append((s["tokens"][at].tolist(), s["labels"][at][s["loss_mask"][at].bool()].tolist()))
    return out


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def test_text_format_loss_everywhere_and_one_eos(tok, tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"text": "hello world"}, {"text": "ends already<|im_end|>\n"}, "",
                                         {"text": "x", "extra": 1}])
    samples, stats = load_sft_samples(path, tok, 32, packing=False)
    assert (stats.format, stats.examples, stats.samples, stats.truncated) == ("text", 3, 3, 0)
    (ids0, loss0), (ids1, loss1), (ids2, _) = _examples(samples)
    eos = tok.eos_token_id
    assert _decode(tok, ids0) == "hello world" and _decode(tok, loss0) == "ello world<|im_end|>"
    # EOS ends the example once: not appended after a text that ends with it (trailing space dropped)
    assert _decode(tok, ids1) == "ends already" and loss1[-1] == eos and loss1.count(eos) == 1
    s = samples[0]
    n = len(ids0)
    assert torch.equal(s["labels"][: n - 1], s["tokens"][1:n]) and s["labels"][n - 1] == eos
    assert s["loss_mask"][:n].eq(1).all() and s["loss_mask"][n:].eq(0).all()
    assert s["document_ids"][n:].eq(-1).all() and torch.equal(s["position_ids"][:n], torch.arange(n))
    assert {k: v.dtype for k, v in s.items()} == dict(tokens=torch.long, labels=torch.long, loss_mask=torch.float32,
                                                      position_ids=torch.long, document_ids=torch.long)
    assert all(v.shape == (32,) for v in s.values())
    assert stats.tokens == 11 + 12 + 1 and stats.loss_tokens == stats.tokens


def test_eos_added_by_the_tokenizer_is_not_doubled(tmp_path):
    tok = _tokenizer(tmp_path / "tok", wrap=True)
    path = _write(tmp_path / "t.jsonl", [{"prompt": "ab", "completion": "c"}])
    (ids, loss), = _examples(load_sft_samples(path, tok, 16, packing=False)[0])
    assert _decode(tok, ids) == "<|im_start|>abc" and _decode(tok, loss) == "c<|im_end|>"


def test_prompt_completion_strings_loss_on_completion(tok, tmp_path):
    path = _write(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}])
    samples, stats = load_sft_samples(path, tok, 16, packing=False)
    (ids, loss), = _examples(samples)
    assert stats.format == "prompt-completion"
    assert _decode(tok, ids) == "2+2= 4" and _decode(tok, loss) == " 4<|im_end|>"


def test_messages_loss_on_assistant_turns_only(tok, tmp_path):
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    path = _write(tmp_path / "m.jsonl", [{"messages": conv}])
    samples, stats = load_sft_samples(path, tok, 128, packing=False)
    (ids, loss), = _examples(samples)
    assert stats.format == "messages"
    rendered = tok.apply_chat_template(conv, tokenize=False)
    # the whole rendering, without the newline after the final EOS (the label of the last input)
    assert _decode(tok, ids) + "<|im_end|>" == rendered.rstrip()
    # each assistant turn: its content and end-of-turn token; headers and user turns are prompt
    assert _decode(tok, loss) == "A1<|im_end|>\nA2<|im_end|>"


def test_eos_appended_when_turns_end_otherwise(tmp_path):
    tok = _tokenizer(tmp_path / "tok", eos="</s>")
    conv = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    path = _write(tmp_path / "m.jsonl", [{"messages": conv}])
    (ids, loss), = _examples(load_sft_samples(path, tok, 128, packing=False)[0])
    assert _decode(tok, ids).endswith("A<|im_end|>\n") and _decode(tok, loss) == "A<|im_end|>\n</s>"


def test_conversational_prompt_completion(tok, tmp_path):
    row = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]}
    samples, stats = load_sft_samples(_write(tmp_path / "c.jsonl", [row]), tok, 128, packing=False)
    (ids, loss), = _examples(samples)
    assert stats.format == "conversational prompt-completion"
    assert _decode(tok, ids).endswith("<|im_start|>assistant\nA") and _decode(tok, loss) == "A<|im_end|>"


def test_truncation_is_counted_and_examples_without_loss_skipped(tok, tmp_path):
    rows = [{"prompt": "p" * 30, "completion": "c"}, {"prompt": "p", "completion": "c" * 20},
            {"prompt": "p", "completion": "c"}]
    samples, stats = load_sft_samples(_write(tmp_path / "t.jsonl", rows), tok, 10, packing=False)
    # 1st: 32 tokens -> 31 positions, no loss left in the first 10: skipped; 2nd: 22 -> 21 positions
    assert (stats.truncated, stats.truncated_tokens, stats.dropped, stats.samples) == (2, 21 + 11, 1, 2)
    assert stats.tokens == 10 + 2 and "2 examples truncated (32 tokens dropped)" in stats.summary()
    (ids, loss), _ = _examples(samples)
    assert _decode(tok, ids) == "p" + "c" * 9 and _decode(tok, loss) == "c" * 10  # cut: no EOS


@pytest.mark.parametrize("rows, line, message", [
    ([{"text": "a"}, "{not json", {"text": "b"}], 2, "not valid JSON"),
    ([{"text": "a"}, "", {"text": 3}], 3, "'text' must be a string"),
    ([{"text": "a"}, {"prompt": "p", "completion": "c"}], 2, "a prompt-completion example in a file of text"),
    ([{"foo": 1}], 1, "expected the keys"),
    ([{"messages": [{"role": "user"}]}], 1, "string 'role' and 'content'"),
    (["[1, 2]"], 1, "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tok, tmp_path, rows, line, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"bad.jsonl:{line}: .*{message}"):
        load_sft_samples(path, tok, 16)


def test_messages_need_a_chat_template(tmp_path):
    tok = _tokenizer(tmp_path / "tok", chat_template=None)
    path = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(ValueError, match="m.jsonl:1: the tokenizer has no chat template"):
        load_sft_samples(path, tok, 16)


def test_packing_keeps_every_example_and_masks_across_them(tok, tmp_path):
    rows = [{"text": "x" * n} for n in (5, 12, 3, 20, 7, 9, 2, 14)]
    path = _write(tmp_path / "p.jsonl", rows)
    plain, _ = load_sft_samples(path, tok, 24, packing=False)
    packed, stats = load_sft_samples(path, tok, 24, packing=True)
    assert stats.samples == len(packed) < len(plain)
    assert sorted(map(str, _examples(packed))) == sorted(map(str, _examples(plain)))
    for s in packed:
        for d in range(int(s["document_ids"].max()) + 1):
            at = s["document_ids"] == d
            assert torch.equal(s["position_ids"][at], torch.arange(int(at.sum())))
    # the same file gives the same samples
    again, _ = load_sft_samples(path, tok, 24, packing=True)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(packed, again) for k in a)


def test_packed_attention_mask():
    docs = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~packed_attention_mask(docs)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert packed_attention_mask(docs).shape == (1, 1, 6, 6) and torch.equal(allowed, expected)


def test_order_contract():
    n, seed = 10, 7
    stream = [i for k in range(6) for i in batch_indices(n, 5, k, seed)]
    # each epoch is a permutation, epochs differ, and the stream does not depend on G
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs) and epochs[0] != epochs[1]
    assert [i for k in range(10) for i in batch_indices(n, 3, k, seed)] == stream[:30]
    assert batch_indices(n, 5, 0, seed + 1) != stream[:5]
    assert batch_indices(3, 7, 1, seed)[:2] == batch_indices(3, 1, 7, seed) + batch_indices(3, 1, 8, seed)
    g = batch_indices(n, 8, 3, seed)
    assert rank_micro_batches(g, 1, 2, 2) == [g[4:6], g[6:8]]
    with pytest.raises(ValueError, match="not a multiple"):
        rank_micro_batches(g, 0, 3, 1)


def test_resume_at_another_dp_size_continues_the_same_global_batches():
    n, G, mbs, seed = 13, 8, 2, 3

    def consumed(step, dp):  # what the ranks of one step read, rank after rank
        g = batch_indices(n, G, step, seed)
        return [i for d in range(dp) for mb in rank_micro_batches(g, d, dp, mbs) for i in mb]

    uninterrupted = [consumed(k, 2) for k in range(6)]
    resumed = [consumed(k, 2) for k in range(3)] + [consumed(k, 4) for k in range(3, 6)]
    assert resumed == uninterrupted


def test_split_eval(tok, tmp_path):
    samples, _ = load_sft_samples(_write(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(20)]), tok, 8)
    train, held = split_eval(samples, 0.2, seed=1)
    key = lambda s: s["tokens"][0].item()  # noqa: E731
    assert len(held) == 4 and len(train) == 16
    assert sorted(map(key, train + held)) == sorted(map(key, samples))
    assert list(map(key, split_eval(samples, 0.2, seed=1)[1])) == list(map(key, held))
    assert list(map(key, split_eval(samples, 0.2, seed=2)[1])) != list(map(key, held))
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_eval(samples, 1.0, 0)


def _packing_body(rank, world, samples_packed, samples_plain):
    """Per-token losses of packed samples and of the same examples run one by one."""
    from megatron_lora.runtime.distributed import init_distributed
    from megatron_lora.model.gpt import build_gpt, gpt_config
    from megatron_lora.runtime.data import packed_attention_mask, stack_samples

    init_distributed(1, seed=0)
    config = gpt_config(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=96)
    model = build_gpt(config, vocab_size=260, max_sequence_length=64).eval()
    with torch.no_grad():
        b = stack_samples(samples_packed)
        mask = packed_attention_mask(b["document_ids"])
        packed = model(b["tokens"], b["position_ids"], mask, labels=b["labels"])
        unmasked = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        alone = []
        for s in samples_plain:  # each example alone, without padding, with the default causal mask
            n = int((s["document_ids"] >= 0).sum())
            ids = s["tokens"][None, :n]
            alone.append(model(ids, s["position_ids"][None, :n], None, labels=s["labels"][None, :n])[0])
    return {"packed": packed, "unmasked": unmasked, "alone": alone}


def test_packing_equality_on_a_megatron_gpt(tok, tmp_path):
    """Packed examples (block-diagonal mask, positions restarting) give the per-token losses of
    the same examples run one by one: RoPE is relative, and megatron-core's local attention
    applies a given mask even when its mask type is causal."""
    rows = [{"text": "the quick brown fox"[: n]} for n in (19, 6, 11, 3, 15, 9)]
    path = _write(tmp_path / "p.jsonl", rows)
    packed, _ = load_sft_samples(path, tok, 32, packing=True)
    plain, _ = load_sft_samples(path, tok, 32, packing=False)
    assert len(packed) < len(plain)
    out = run_ranks(_packing_body, 1, packed, plain)[0]
    by_tokens = {tuple(s["tokens"][s["document_ids"] == 0].tolist()): loss for s, loss in zip(plain, out["alone"])}
    later_docs_differ = False
    for s, losses, unmasked in zip(packed, out["packed"], out["unmasked"]):
        for d in range(int(s["document_ids"].max()) + 1):
            at = s["document_ids"] == d
            solo = by_tokens[tuple(s["tokens"][at].tolist())]
            torch.testing.assert_close(losses[at], solo, rtol=0, atol=1e-5)
            later_docs_differ |= d > 0 and not torch.allclose(unmasked[at], solo, atol=1e-3)
    assert later_docs_differ  # without the mask, packing would not be equal: the test can fail


def test_held_out_prompts_are_the_tokens_before_the_first_answer(tok, tmp_path):
    from megatron_lora.runtime.data import held_out_prompts

    chat = tmp_path / "eval.jsonl"
    _write(chat, [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
                  for i in (1, 2, 3)])
    got = held_out_prompts(chat, tok, 2)
    assert [ref.strip() for _, ref in got] == ["A1", "A2"]
    first, _ = got[0]
    assert tok.decode(first).endswith("<|im_start|>assistant\n") and "A1" not in tok.decode(first)
    text = tmp_path / "text.jsonl"
    _write(text, [{"text": "no prompt here"}])
    assert held_out_prompts(text, tok, 2) == []
