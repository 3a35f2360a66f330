"""Static decoding (fixed shapes, device-side counts: what a CUDA graph captures) gives the same
logits as ordinary steps, across unit packing and a pool that fills and grows; on a GPU the same
runs as a captured graph."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import agentmem
from agentmem.generate import decode_one_token, prefill
from agentmem.hf.graphs import StaticDecoder, StaticSteps
from agentmem.hf.seam import cache_kwargs
from tests.helpers import COMMON, VOCAB, build

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = agentmem.MemoryConfig(n_init=4, unit_size=8, topk=2, n_local=24, exec_chunk=16)


def _model_and_tokens(seed: int, n_tokens: int, batch: int = 1, memory=CONFIG):
    """A wrapped Llama with Triton-sized heads, and token ids with no token twice: a first
    layer's pre-RoPE keys depend on the token alone, and two units with the same representative
    tie exactly, which top-k may break either way."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**COMMON, "vocab_size": 1024, "head_dim": 32})
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    agentmem.wrap(model, memory)
    tokens = torch.stack([torch.randperm(1021)[:n_tokens] + 3 for _ in range(batch)])
    return model, tokens.to(DEVICE)


def _twin_caches(model, prompt, memory=None):
    """Two memories that have read the same prompt."""
    caches = agentmem.new_cache(model, memory), agentmem.new_cache(model, memory)
    for cache in caches:
        prefill(model, cache, prompt, chunk=16)
    return caches


@pytest.mark.parametrize("position", ["infllm", "stacked"])
@pytest.mark.parametrize("repr", ["attention", "mean"])
@pytest.mark.parametrize(("query_window", "retrieve_every"), [(1, 1), (6, 1), (6, 3)])
def test_static_steps_equal_ordinary_steps(position, repr, query_window, retrieve_every):
    model, tokens = _model_and_tokens(0, 180, batch=2)
    config = CONFIG.model_copy(
        update={"position": position, "repr": repr, "query_window": query_window,
                "retrieve_every": retrieve_every}
    )  # fmt: skip
    prompt, follow = tokens[:, :100], tokens[:, 100:]
    ordinary, static = _twin_caches(model, prompt, config)
    # unit_room=1: the pool fills within the 80 steps and must grow (capture again)
    decoder = StaticDecoder(model, static, unit_room=1)
    for token in follow.T:
        want = decode_one_token(model, ordinary, token)
        got = decoder.step(token)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert decoder.unit_room > 1
    for a, b in zip(ordinary.memory_layers, static.memory_layers, strict=True):
        assert a.seen == b.seen == 180 and a.n_local == b.n_local
        assert a.units.n_units == b.units.n_units
        torch.testing.assert_close(b.local_mass, a.local_mass, atol=1e-4, rtol=1e-4)
        assert torch.equal(b.last_ids.sort(-1).values, a.last_ids.sort(-1).values)
        if query_window > 1:  # the latest queries, a ring in place for the captured steps,
            saved = b.state_dict()["tensors"]["recent_q"]  # handed out oldest first
            torch.testing.assert_close(saved, a.recent_q, atol=1e-4, rtol=1e-4)
    decoder.close()
    for a, b in zip(ordinary.memory_layers, static.memory_layers, strict=True):
        if query_window > 1:  # and oldest first again once static steps end
            torch.testing.assert_close(b.recent_q, a.recent_q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(  # ordinary steps again, from where static decoding left off
        decode_one_token(model, static, follow[:, 0]),
        decode_one_token(model, ordinary, follow[:, 0]), atol=1e-4, rtol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("position", "retrieve_every"), [("infllm", 1), ("stacked", 1), ("infllm", 2)]
)
def test_static_steps_of_a_tiered_memory_equal_ordinary_steps_of_a_whole_one(
    position, retrieve_every
):
    """KV tiers under static steps: the host pool (pinned on a GPU, read in place by the captured
    copy) and the device cache give the logits of a memory that holds every unit on its device."""
    model, tokens = _model_and_tokens(1, 200)
    config = CONFIG.model_copy(update={"position": position, "retrieve_every": retrieve_every})
    tiered = config.model_copy(update={"device_units": 3})
    prompt, follow = tokens[:, :100], tokens[:, 100:]
    ordinary = agentmem.new_cache(model, config)
    static = agentmem.new_cache(model, tiered)
    for cache in (ordinary, static):
        prefill(model, cache, prompt, chunk=16)
    decoder = StaticDecoder(model, static, unit_room=2)
    for token in follow.T:
        want = decode_one_token(model, ordinary, token)
        torch.testing.assert_close(decoder.step(token), want, atol=1e-4, rtol=1e-4)
    assert decoder.unit_room > 2  # the host pool filled and moved: captured again
    decoder.close()
    for a, b in zip(ordinary.memory_layers, static.memory_layers, strict=True):
        assert torch.equal(b.last_ids.sort(-1).values, a.last_ids.sort(-1).values)
        assert b.units.keys.buffer.device.type == "cpu"
        assert b.units.keys.buffer.is_pinned() == (DEVICE == "cuda")
        assert b.units.cache.keys.device.type == DEVICE
        assert 0 < b.units.cache.hit_rate() < 1


@pytest.mark.parametrize("static", [False, True])
def test_decoding_retrieves_every_few_tokens(static):
    """retrieve_every=3: a decoded token retrieves where the stream reaches a multiple of 3
    tokens, and the first after a prompt always; the others attend the units chosen last. The
    first layer's queries and keys depend on the tokens alone, so there a memory that retrieves
    every token shows what each retrieval chooses. Both step paths keep the schedule, a capture
    renewed midway (unit_room=1) included."""
    model, tokens = _model_and_tokens(2, 230)
    every_token = agentmem.new_cache(model, CONFIG)
    every_third = agentmem.new_cache(model, CONFIG.model_copy(update={"retrieve_every": 3}))
    for cache in (every_token, every_third):
        prefill(model, cache, tokens[:, :101], chunk=16)
    decoder = StaticDecoder(model, every_third, unit_room=1) if static else None
    fresh, kept = every_token.memory_layers[0], every_third.memory_layers[0]
    chosen, changed = None, 0
    for token in tokens[:, 101:].T:
        decode_one_token(model, every_token, token)
        if static:
            decoder.step(token)
        else:
            decode_one_token(model, every_third, token)
        if kept.seen == 102 or kept.seen % 3 == 0:  # retrieved: what retrieving chooses now
            chosen = fresh.last_ids.sort(-1).values
        else:  # kept: the last choice, where a retrieval would often choose others
            changed += not torch.equal(fresh.last_ids.sort(-1).values, chosen)
        assert torch.equal(kept.last_ids.sort(-1).values, chosen)
    assert changed >= 5
    if static:
        assert decoder.unit_room > 1  # the pool filled: captured again, the schedule kept
        decoder.close()


def test_static_decoding_needs_a_steady_state():
    model = build("llama").to(DEVICE)
    agentmem.wrap(model, CONFIG)
    cache = agentmem.new_cache(model)
    prefill(model, cache, torch.randint(3, VOCAB, (1, 20), device=DEVICE), chunk=16)
    with pytest.raises(ValueError, match="at least topk"):
        StaticDecoder(model, cache)
    streaming = agentmem.new_cache(model, agentmem.MemoryConfig.preset("streaming"))
    with pytest.raises(ValueError, match="'infllm' or 'stacked'"):
        StaticDecoder(model, streaming)


@pytest.mark.parametrize("tokens", [1, 16])
def test_static_steps_with_sliding_layers_equal_ordinary_steps(tokens):
    """Gemma 3's sliding layers shift their window in place in static steps: decoding and chunks
    of 16 give the logits and memory of ordinary steps, and ordinary steps resume afterwards."""
    model = build("gemma3", head_dim=32).to(DEVICE)
    agentmem.wrap(model, CONFIG)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 260), device=DEVICE)
    ordinary, static = _twin_caches(model, ids[:, :96])  # chunks of 16: the window full
    steps = StaticSteps(model, static, tokens=tokens, unit_room=1)
    with torch.inference_mode():
        for first in range(96, 256, tokens):
            piece = ids[:, first : first + tokens]
            want = model(piece, **cache_kwargs(model, ordinary)).logits[:, -1]
            torch.testing.assert_close(steps.run(piece), want, atol=1e-4, rtol=1e-4)
    steps.close()
    for a, b in zip(ordinary.layers, static.layers, strict=True):
        assert a.state.seen == b.state.seen == 256
    for a, b in zip(ordinary.sliding_layers, static.sliding_layers, strict=True):
        keep = a.window - 1
        torch.testing.assert_close(b.k[:, :, -keep:], a.k[:, :, -keep:])
    with torch.inference_mode():  # ordinary steps again, from where the static ones left off
        torch.testing.assert_close(
            model(ids[:, -3:], **cache_kwargs(model, static)).logits,
            model(ids[:, -3:], **cache_kwargs(model, ordinary)).logits, atol=1e-4, rtol=1e-4,
        )  # fmt: skip


def test_sliding_layers_start_static_steps_once_their_window_is_full():
    model = build("gemma3", head_dim=32).to(DEVICE)
    agentmem.wrap(model, CONFIG)
    cache = agentmem.new_cache(model)
    prefill(model, cache, torch.randint(3, VOCAB, (1, 30), device=DEVICE), chunk=16)
    sliding = cache.layers[0].state  # window 24: 23 tokens kept, and the 14 of the last step
    assert sliding.static_problem(1) is None
    assert "it holds 30" in sliding.static_problem(16)
    with pytest.raises(ValueError, match="sliding layer holds"):
        sliding.start_static(16)


@pytest.mark.parametrize(
    ("repr", "query_window", "device_units"),
    [("attention", 1, None), ("minmax", 1, None), ("mean", 40, None), ("mean", 40, 3)],
)
def test_static_prefill_chunks_equal_ordinary_chunks(repr, query_window, device_units):
    # chunks of 16 = 2 units of 8; a query window of 40 joins each chunk to earlier queries;
    # device_units: the static memory's units packed into its host pool by the captured copy
    memory = CONFIG.model_copy(update={"repr": repr, "query_window": query_window})
    model, tokens = _model_and_tokens(1, 300, batch=2, memory=memory)
    tiered = memory.model_copy(update={"device_units": device_units})
    ordinary, static = agentmem.new_cache(model, memory), agentmem.new_cache(model, tiered)
    for cache in (ordinary, static):
        prefill(model, cache, tokens[:, :60], chunk=16)
    steps = StaticSteps(model, static, tokens=16, unit_room=4)  # grows twice on the way
    with torch.inference_mode():  # the caches' tensors were made under inference mode
        for first in range(60, 300, 16):
            piece = tokens[:, first : first + 16]
            if piece.shape[1] < 16:
                break
            want = model(piece, **cache_kwargs(model, ordinary)).logits[:, -1]
            torch.testing.assert_close(steps.run(piece), want, atol=1e-4, rtol=1e-4)
    steps.close()
    for a, b in zip(ordinary.memory_layers, static.memory_layers, strict=True):
        assert a.seen == b.seen and a.n_local == b.n_local
        assert a.units.n_units == b.units.n_units
        keys = a.units.keys.data  # the tiered pool is in host memory
        torch.testing.assert_close(b.units.keys.data.to(keys.device), keys)
        torch.testing.assert_close(b.units.reps.data, a.units.reps.data)
        torch.testing.assert_close(b.local_mass, a.local_mass, atol=1e-4, rtol=1e-4)
        assert torch.equal(b.last_ids.sort(-1).values, a.last_ids.sort(-1).values)
    with pytest.raises(ValueError, match="multiple of unit_size"):
        StaticSteps(model, static, tokens=12)


def test_prefill_steps_static_chunks_then_a_shorter_last_piece(monkeypatch):
    """prefill's use of static chunk steps (graphs off here, so that it runs on the CPU): the
    same logits and memory as ordinary chunks, a last piece shorter than a chunk included."""
    import agentmem.generate as generate

    model, tokens = _model_and_tokens(2, 250)
    used = []

    def eager_static_chunks(model, cache, tokens, remaining):
        if any(layer.static_problem(tokens) for layer in cache.memory_layers):
            return None
        used.append(StaticSteps(model, cache, tokens=tokens, unit_room=2, graph=False))
        return used[-1]

    monkeypatch.setattr(generate, "GRAPH_MIN_TOKENS", 0)
    monkeypatch.setattr(generate, "static_chunks", eager_static_chunks)
    static = agentmem.new_cache(model)
    got = generate.prefill(model, static, tokens, chunk=16)  # 15 chunks of 16, then 10 tokens
    monkeypatch.setattr(generate, "static_chunks", lambda *args, **kwargs: None)
    ordinary = agentmem.new_cache(model)
    want = generate.prefill(model, ordinary, tokens, chunk=16)
    assert len(used) == 1 and all(layer.counts is None for layer in static.memory_layers)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(ordinary.memory_layers, static.memory_layers, strict=True):
        assert a.seen == b.seen == 250 and a.units.n_units == b.units.n_units
        torch.testing.assert_close(b.units.reps.data, a.units.reps.data)


def test_a_failed_capture_leaves_ordinary_steps_working(monkeypatch, caplog):
    """If capturing fails (a GPU without room, a driver refusing), decoding goes on eagerly from
    the memory as it was, and the log says why, once."""
    import agentmem.hf.graphs as graphs

    model, tokens = _model_and_tokens(3, 110)
    failing, ordinary = _twin_caches(model, tokens[:, :100])

    def broken_capture(self):
        self._warm_up()  # the warm-up runs (and changes the memory, then undoes it) ...
        raise RuntimeError("capture failed")  # ... and the capture fails

    monkeypatch.setattr(graphs, "capturable", lambda *args: True)
    monkeypatch.setattr(graphs.StaticSteps, "_capture", broken_capture)
    # The failure turns graphs off for the process: only for this test's.
    monkeypatch.setattr(graphs, "_capture_failures", [])
    assert graphs.static_decoder(model, failing, 64) is None
    assert "capture failed" in caplog.text
    for a, b in zip(failing.memory_layers, ordinary.memory_layers, strict=True):
        # Starting packed the full window's oldest unit (as the next step would have); the
        # warm-up's mass was undone.
        packed = b.n_local - a.n_local
        assert a.counts is None and a.seen == b.seen and packed in (0, CONFIG.unit_size)
        assert a.units.n_units == b.units.n_units + packed // CONFIG.unit_size
        torch.testing.assert_close(a.local_mass, b.local_mass[..., packed:])
    for token in tokens[:, 100:].T:
        torch.testing.assert_close(
            decode_one_token(model, failing, token), decode_one_token(model, ordinary, token)
        )


def test_ordinary_steps_between_static_ones_and_after_close():
    """Another caller's ordinary step ends static mode (the host's records stay the truth); the
    decoder starts again on its next step; run after close starts again too."""
    model, tokens = _model_and_tokens(4, 140)
    mixed, ordinary = _twin_caches(model, tokens[:, :100])
    decoder = StaticDecoder(model, mixed, graph=False)
    for i, token in enumerate(tokens[:, 100:].T):
        want = decode_one_token(model, ordinary, token)
        if i % 5 == 2:
            got = decode_one_token(model, mixed, token)  # ordinary, in between
            assert all(layer.counts is None for layer in mixed.memory_layers)
        elif i == 30:
            decoder.close()
            got = decoder.step(token)
        else:
            got = decoder.step(token)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(mixed.memory_layers, ordinary.memory_layers, strict=True):
        assert a.seen == b.seen == 140 and a.n_local == b.n_local
