"""The KV cache changes the cost of generation, never its result."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llminfer
from llminfer.attention import AttentionMetadata, cache_attention, write_kv
from llminfer.kv import ContiguousKVCache
from llminfer.models.loader import load_checkpoint


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    config = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return load_checkpoint(path, device="cpu", dtype=torch.float32)


def dense_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.mark.parametrize("chunks", [[7], [1] * 7, [4, 1, 1, 1], [3, 3, 5, 1]])
def test_appending_in_chunks_gives_the_dense_logits(gqa_model, chunks):
    ids = torch.randint(0, 97, (sum(chunks),)).tolist()
    cache = ContiguousKVCache(gqa_model.config, batch_size=1, max_len=sum(chunks) + 2)
    got, start = [], 0
    with torch.no_grad():
        for n in chunks:                                   # prefill, chunked prefill, then decode steps
            got.append(gqa_model(torch.tensor(ids[start:start + n]), cache, cache.append([n])))
            start += n
    torch.testing.assert_close(torch.cat(got), dense_logits(gqa_model, ids), atol=1e-5, rtol=1e-5)


def test_a_flattened_batch_of_unequal_lengths_matches_each_sequence(gqa_model):
    lengths = [5, 1, 12]
    seqs = [torch.randint(0, 97, (n + 2,)).tolist() for n in lengths]
    cache = ContiguousKVCache(gqa_model.config, batch_size=3, max_len=16)
    with torch.no_grad():
        flat_prompts = torch.tensor([t for s, n in zip(seqs, lengths) for t in s[:n]])
        prefill = gqa_model(flat_prompts, cache, cache.append(lengths))
        decode = [gqa_model(torch.tensor([s[n + j] for s, n in zip(seqs, lengths)]), cache, cache.append([1, 1, 1]))
                  for j in range(2)]
    offsets = [0, 5, 6, 18]
    for i, (seq, n) in enumerate(zip(seqs, lengths)):
        want = dense_logits(gqa_model, seq)
        torch.testing.assert_close(prefill[offsets[i]:offsets[i + 1]], want[:n], atol=1e-5, rtol=1e-5)
        for j in range(2):
            torch.testing.assert_close(decode[j][i], want[n + j], atol=1e-5, rtol=1e-5)


def test_paged_block_tables_give_the_same_attention():
    """Scattering a sequence over random blocks changes nothing (the Part II layout)."""
    heads, kv_heads, dim, block = 4, 2, 8, 3
    lengths = [7, 1, 10]
    blocks = torch.randperm(12).tolist()
    tables = [blocks[0:3], blocks[3:4], blocks[4:8]]
    meta = AttentionMetadata.build(lengths, [0, 0, 0], tables, block_size=block)
    n = sum(lengths)
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    k_cache, v_cache = torch.zeros(12, block, kv_heads, dim), torch.zeros(12, block, kv_heads, dim)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = cache_attention(q, k_cache, v_cache, meta)
    start = 0
    for length in lengths:      # reference: plain causal attention on each sequence alone
        s = slice(start, start + length)
        keys, values = (x[s].repeat_interleave(heads // kv_heads, 1).transpose(0, 1) for x in (k, v))
        want = torch.nn.functional.scaled_dot_product_attention(
            q[s].transpose(0, 1), keys, values, is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[s], want, atol=1e-5, rtol=1e-5)
        start += length


def test_slots_follow_the_block_table_and_minus_one_is_not_stored():
    # Sequence 0 has 2 cached tokens (in block 5) and adds 3: positions 2, 3 go to block 1, 4 to block 3.
    meta = AttentionMetadata.build([3, 2], [2, 0], [[5, 1, 3], [0]], block_size=2)
    assert meta.slot_mapping.tolist() == [1 * 2 + 0, 1 * 2 + 1, 3 * 2 + 0, 0, 1]
    assert meta.positions.tolist() == [2, 3, 4, 0, 1] and meta.seq_lens.tolist() == [5, 2]
    assert meta.block_tables.tolist() == [[5, 1, 3], [0, -1, -1]]
    k_cache = torch.zeros(2, 2, 1, 1)
    write_kv(k_cache, k_cache.clone(), torch.ones(3, 1, 1), torch.ones(3, 1, 1), torch.tensor([0, -1, 3]))
    assert k_cache.flatten().tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="do not fit"):
        AttentionMetadata.build([5], [0], [[0]], block_size=4)


def test_cache_refuses_to_overflow_and_reports_its_size(gqa_model):
    cfg = gqa_model.config
    cache = ContiguousKVCache(cfg, batch_size=2, max_len=4)
    assert cache.nbytes == 2 * cfg.num_layers * 2 * 4 * cfg.num_kv_heads * cfg.head_dim * 4
    cache.append([4, 1])
    with pytest.raises(ValueError, match="sequence 0 would hold 5 tokens"):
        cache.append([1, 1])


@pytest.fixture(scope="module")
def shipped():
    return llminfer.load_model("tiny-shakespeare", device="cpu")


@pytest.mark.parametrize("params", [
    llminfer.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
    llminfer.SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=60),
], ids=["greedy", "seeded-sampling"])
def test_cached_and_uncached_loops_generate_the_same_tokens(shipped, params):
    model, tokenizer = shipped
    prompt = tokenizer.encode("JULIET:\nO Romeo, Romeo!")
    assert list(llminfer.generate_tokens(model, prompt, params)) == list(
        llminfer.generate_tokens_no_cache(model, prompt, params))


def test_shipped_model_cached_logits_match_dense(shipped):
    model, tokenizer = shipped
    ids = tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.")
    cache = ContiguousKVCache(model.config, batch_size=1, max_len=len(ids))
    with torch.no_grad():
        got = torch.cat([model(torch.tensor(ids[:10]), cache, cache.append([10]))] +
                        [model(torch.tensor([t]), cache, cache.append([1])) for t in ids[10:]])
    torch.testing.assert_close(got, dense_logits(model, ids), atol=1e-5, rtol=1e-5)
