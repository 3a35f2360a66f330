"""The Triton `memory_attention`, `unit_mass` and `local_key_mass` kernels against their references:
sinks, units read through an index table, a local window shorter than its buffer (its length given
as a device tensor), infllm and stacked positions, GQA, decode (split-K) and prefill row tiles,
partial blocks, fp32 and fp16, scratch poisoned with NaN. The references are checked against
first principles too. Runs in Triton's interpreter on the CPU and natively on a GPU."""

from __future__ import annotations

import pytest
import torch

from agentmem_kernels import reference
from tests.helpers import PlainRope

triton_memory = pytest.importorskip("agentmem_kernels.triton_memory")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT = 16


pytestmark = pytest.mark.usefixtures("poisoned_scratch")


def _table(n_positions: int, head_dim: int):
    cos, sin = PlainRope(head_dim).table(n_positions, torch.float32, torch.device(DEVICE))
    return cos, sin


def _memory_case(n_queries, *, n_sinks=5, n_units=6, k=3, n_local=37, capacity=48,
                 heads=(4, 2), head_dim=32, dtype=torch.float32, seed=0):  # fmt: skip
    torch.manual_seed(seed)
    n_q, n_kv = heads

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    ids = torch.stack([torch.sort(torch.randperm(n_units)[:k]).values for _ in range(2 * n_kv)])
    cos, sin = _table(256, head_dim)
    return dict(
        q=randn(2, n_q, n_queries, head_dim),
        sink_k=randn(2, n_kv, n_sinks, head_dim) if n_sinks else None,
        sink_v=randn(2, n_kv, n_sinks, head_dim) if n_sinks else None,
        pool_k=randn(2, n_kv, n_units * UNIT, head_dim),
        pool_v=randn(2, n_kv, n_units * UNIT, head_dim),
        ids=ids.view(2, n_kv, k).to(DEVICE) if k else None,
        unit_size=UNIT,
        local_k=randn(2, n_kv, capacity, head_dim),
        local_v=randn(2, n_kv, capacity, head_dim),
        n_local=n_local,
        cos=cos, sin=sin, scale=head_dim**-0.5, memory_q_pos=100,
    )  # fmt: skip


def _compare_memory(case, *, stacked=False, as_tensor=False):
    want, want_lse, _ = reference.memory_attention(**case, stacked=stacked)
    if as_tensor:
        case = {**case, "n_local": torch.tensor([case["n_local"]], device=DEVICE)}
    got, got_lse, _ = triton_memory.memory_attention(**case, stacked=stacked)
    error = (got - want).norm() / want.norm()
    bound = 2e-3 if case["q"].dtype == torch.float16 else 1e-5
    assert error < bound, f"relative error {error:.2e}"
    torch.testing.assert_close(got_lse, want_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n_queries", [1, 36])  # split over the keys and merged; 2 row tiles
def test_output_in_the_models_dtype(n_queries):
    """out_dtype: the result written in it by the kernel (no conversion after), equal to the
    fp32 result rounded once."""
    case = _memory_case(n_queries, heads=(8, 2), dtype=torch.float16)
    want, _, _ = reference.memory_attention(**case)
    got, _, _ = triton_memory.memory_attention(**case, out_dtype=torch.float16)
    assert got.dtype == torch.float16
    as_fp16, _, _ = reference.memory_attention(**case, out_dtype=torch.float16)
    assert torch.equal(as_fp16, want.to(torch.float16))
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stacked", [False, True])
def test_decode_step(dtype, stacked):
    _compare_memory(_memory_case(1, heads=(8, 2), dtype=dtype), stacked=stacked, as_tensor=True)


@pytest.mark.parametrize("stacked", [False, True])
def test_prefill_chunk_over_several_row_tiles(stacked):
    # 2 query heads per key head x 80 queries = 160 rows: two row tiles, causal in the local part
    _compare_memory(_memory_case(80, n_local=85, capacity=90, head_dim=64), stacked=stacked)


@pytest.mark.parametrize("n_queries", [1, 80])
def test_whole_blocks_take_the_unmasked_path(n_queries):
    # 64 sinks and 4 x 16 unit keys fill whole key blocks (no masks there); 200 local keys put
    # whole blocks before each tile's causal edge and a partial block after it.
    case = _memory_case(n_queries, n_sinks=64, k=4, n_local=200, capacity=208, head_dim=64)
    _compare_memory(case, as_tensor=n_queries == 1)


@pytest.mark.parametrize("n_queries", [1, 12])
def test_local_keys_stored_rotated(n_queries):
    """Keys kept rotated to their local positions give what pre-RoPE keys give."""
    case = _memory_case(n_queries, heads=(8, 2))
    want, want_lse, _ = reference.memory_attention(**case)
    cos, sin = case["cos"], case["sin"]
    capacity = case["local_k"].shape[2]
    rotated = reference.rope(case["local_k"], cos[:capacity], sin[:capacity])
    case = {**case, "local_k": rotated, "local_rotated": True}
    for implementation in (reference.memory_attention, triton_memory.memory_attention):
        got, got_lse, _ = implementation(**case)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    mass = reference.local_key_mass(
        case["q"], rotated, n_local=case["n_local"], lse=want_lse, cos=cos, sin=sin,
        scale=case["scale"], local_rotated=True,
    )  # fmt: skip
    want_mass = reference.local_key_mass(
        case["q"], _memory_case(n_queries, heads=(8, 2))["local_k"], n_local=case["n_local"],
        lse=want_lse, cos=cos, sin=sin, scale=case["scale"],
    )  # fmt: skip
    torch.testing.assert_close(mass, want_mass, atol=1e-5, rtol=1e-5)


def test_without_sinks_or_units():
    _compare_memory(_memory_case(3, n_sinks=0, k=0))
    _compare_memory(_memory_case(3, n_sinks=0, k=2))


@pytest.mark.parametrize("attention_scaling", [1.0, 1.3])  # 1.3: a YaRN-like table
def test_the_window_the_index_table_names_from_first_principles(attention_scaling):
    """The window written out, every key at its position by hand, as transformers would rotate
    it (cos and sin tables that carry the model's attention scaling); the references and the
    kernel, local keys stored plain and rotated, agree with it."""
    case = _memory_case(2, n_sinks=3, k=2, n_local=9, capacity=12)
    case["cos"], case["sin"] = case["cos"] * attention_scaling, case["sin"] * attention_scaling
    q, cos, sin = case["q"].float(), case["cos"], case["sin"]
    rotated = reference.rope(case["local_k"], cos[:12], sin[:12])
    outs = [
        implementation(**case)[0] for implementation in
        (reference.memory_attention, triton_memory.memory_attention)
    ] + [
        implementation(**{**case, "local_k": rotated, "local_rotated": True})[0]
        for implementation in (reference.memory_attention, triton_memory.memory_attention)
    ]  # fmt: skip
    for b in range(2):
        for h in range(4):
            kv = h // 2
            ids = case["ids"][b, kv].tolist()
            mem_k = torch.cat([case["sink_k"][b, kv]] + [
                case["pool_k"][b, kv, i * UNIT : (i + 1) * UNIT] for i in ids
            ])  # fmt: skip
            mem_v = torch.cat([case["sink_v"][b, kv]] + [
                case["pool_v"][b, kv, i * UNIT : (i + 1) * UNIT] for i in ids
            ])  # fmt: skip
            for t in range(2):
                q_pos = 9 - 2 + t
                q_mem = reference.rope(q[b, h, t], cos[100], sin[100])
                q_loc = reference.rope(q[b, h, t], cos[q_pos], sin[q_pos])
                local_k = reference.rope(case["local_k"][b, kv, : q_pos + 1], cos[: q_pos + 1],
                                         sin[: q_pos + 1])  # fmt: skip
                mem = reference.rope(mem_k, cos[0], sin[0])
                logits = torch.cat((mem @ q_mem, local_k @ q_loc)) * case["scale"]
                values = torch.cat((mem_v, case["local_v"][b, kv, : q_pos + 1]))
                want = torch.softmax(logits, 0) @ values
                for out in outs:
                    torch.testing.assert_close(out[b, h, t], want, atol=1e-5, rtol=1e-5)


def test_local_key_mass_matches_the_attention_weights():
    case = _memory_case(4, n_local=20, capacity=24)
    out, lse, _ = reference.memory_attention(**case)
    mass = reference.local_key_mass(
        case["q"], case["local_k"], n_local=torch.tensor(20, device=DEVICE), lse=lse,
        cos=case["cos"], sin=case["sin"], scale=case["scale"],
    )  # fmt: skip
    # The same keys through placed_attention, which reports the mass of keys from mass_from on.
    n_memory = 5 + 3 * UNIT
    mem_k = torch.cat(
        (case["sink_k"], reference.gather_units(case["pool_k"], case["ids"], UNIT)), 2
    )
    mem_v = torch.cat(
        (case["sink_v"], reference.gather_units(case["pool_v"], case["ids"], UNIT)), 2
    )
    k = torch.cat((mem_k, case["local_k"][:, :, :20]), 2)
    v = torch.cat((mem_v, case["local_v"][:, :, :20]), 2)
    k_pos = torch.cat((torch.zeros(n_memory, dtype=torch.long), torch.arange(20))).to(DEVICE)
    k_abs = torch.cat((torch.full((n_memory,), -1), torch.arange(20))).to(DEVICE)
    q_pos = torch.stack((torch.full((4,), 100), torch.arange(16, 20))).to(DEVICE)
    _, _, want = reference.placed_attention(
        case["q"], k, v, q_pos=q_pos,
        k_pos=k_pos.expand(2, 2, -1), q_abs=torch.arange(16, 20, device=DEVICE),
        k_abs=k_abs.expand(2, 2, -1),
        parts=[(0, n_memory, 0, None), (n_memory, n_memory + 20, 0, None)], cos=case["cos"],
        sin=case["sin"], scale=case["scale"], mass_from=n_memory,
    )  # fmt: skip
    torch.testing.assert_close(mass[..., :20], want, atol=1e-5, rtol=1e-5)
    assert torch.all(mass[..., 20:] == 0)


@pytest.mark.parametrize("n_queries", [1, 12])
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_local_key_mass(n_queries, rotated, dtype):
    case = _memory_case(n_queries, heads=(4, 2), n_local=70, capacity=90, dtype=dtype)
    _, lse, _ = reference.memory_attention(**case)
    local_k = case["local_k"]
    if rotated:
        local_k = reference.rope(local_k.float(), case["cos"][:90], case["sin"][:90]).to(dtype)
    args = dict(
        n_local=torch.tensor([70], device=DEVICE), lse=lse, cos=case["cos"], sin=case["sin"],
        scale=case["scale"], local_rotated=rotated,
    )  # fmt: skip
    got = triton_memory.local_key_mass(case["q"], local_k, **args)
    want = reference.local_key_mass(case["q"], local_k, **args)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
    assert torch.all(got[..., 70:] == 0)


@pytest.mark.parametrize("kind", ["dot", "minmax"])
# 2 heads a group: 2 rows, lse combined in the kernel; 60, logits kept between the passes; 300,
# more than KEEP_LOGITS_MAX_ROWS, computed again
@pytest.mark.parametrize("n_queries", [1, 30, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unit_mass(kind, n_queries, dtype):
    torch.manual_seed(3)
    q = torch.randn(2, 4, n_queries, 32, dtype=dtype, device=DEVICE)
    reps = torch.randn(2, 2, 75, 4, 32, dtype=dtype, device=DEVICE)  # 75 units: a partial block
    if kind == "minmax":
        reps = torch.cat((reps.amin(3, keepdim=True), reps.amax(3, keepdim=True)), dim=3)
    n_valid = torch.tensor([70], dtype=torch.int32, device=DEVICE)  # the rest is spare capacity
    assert 2 * 30 <= triton_memory.KEEP_LOGITS_MAX_ROWS < 2 * 150  # the three paths above
    got = triton_memory.unit_mass(q, reps, kind=kind, scale=0.3, n_valid=n_valid)
    want = reference.unit_mass(q, reps, kind=kind, scale=0.3, n_valid=n_valid)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got, want, atol=tolerance * n_queries, rtol=tolerance)
    assert torch.all(got[..., 70:] == -1)
    if dtype == torch.float32:
        assert torch.equal(reference.top_units(got, 5), reference.top_units(want, 5))


# 40 units fit one block (a single pass); 75 and more take several: one query's rows are combined
# by each program of the second pass, 30 or 150 queries' by a launch of their own, which beyond
# 32 blocks (2,100 units in 66 blocks of 32 at 30 queries) splits the blocks over programs whose
# partial statistics the second pass combines.
@pytest.mark.parametrize(("capacity", "valid"), [(40, 33), (75, 70), (700, 600), (2100, 2000)])
@pytest.mark.parametrize("n_queries", [1, 30, 150])
def test_unit_mass_by_number_of_blocks(capacity, valid, n_queries):
    torch.manual_seed(5)
    q = torch.randn(1, 4, n_queries, 32, device=DEVICE)
    reps = torch.randn(1, 2, capacity, 2, 32, device=DEVICE)
    n_valid = torch.tensor([valid], dtype=torch.int32, device=DEVICE)
    got = triton_memory.unit_mass(q, reps, kind="dot", scale=0.3, n_valid=n_valid)
    want = reference.unit_mass(q, reps, kind="dot", scale=0.3, n_valid=n_valid)
    torch.testing.assert_close(got, want, atol=1e-5 * n_queries, rtol=1e-5)
    assert torch.all(got[..., valid:] == -1)
    # every query row spreads a mass of one over the valid units
    torch.testing.assert_close(
        got[..., :valid].sum(-1), torch.full((1, 2), 2.0 * n_queries, device=DEVICE)
    )


def test_unit_mass_without_a_count_scores_every_unit():
    torch.manual_seed(4)
    q = torch.randn(1, 2, 1, 64, device=DEVICE)
    reps = torch.randn(1, 1, 130, 1, 64, device=DEVICE)
    got = triton_memory.unit_mass(q, reps, kind="dot", scale=0.125)
    torch.testing.assert_close(got, reference.unit_mass(q, reps, kind="dot", scale=0.125))
    torch.testing.assert_close(got.sum(-1), torch.full((1, 1), 2.0, device=DEVICE))  # 2 rows


@pytest.mark.parametrize("rotated", [False, True])
def test_memory_attention_returns_the_local_keys_mass(rotated):
    """with_local_mass: the reference reads it off its own softmax, the kernel path makes a second
    pass from the lse; both equal `local_key_mass`, and 0 past the window."""
    case = _memory_case(5, heads=(4, 2), n_local=40, capacity=48)
    if rotated:
        case["local_k"] = reference.rope(case["local_k"], case["cos"][:48], case["sin"][:48])
    case["local_rotated"] = rotated
    _, lse, none = reference.memory_attention(**case)
    assert none is None
    want = reference.local_key_mass(
        case["q"], case["local_k"], n_local=40, lse=lse, cos=case["cos"], sin=case["sin"],
        scale=case["scale"], local_rotated=rotated,
    )  # fmt: skip
    for implementation in (reference.memory_attention, triton_memory.memory_attention):
        _, _, mass = implementation(**case, with_local_mass=True)
        torch.testing.assert_close(mass, want, atol=1e-5, rtol=1e-5)
        assert mass.shape == (2, 2, 48) and torch.all(mass[..., 40:] == 0)


def test_unit_mass_skips_spare_capacity():
    """A pool with room for many more units than it holds: blocks past the count compute
    nothing and their units get -1 (whether the logits are kept between passes or recomputed)."""
    torch.manual_seed(6)
    reps = torch.randn(1, 2, 300, 2, 32, device=DEVICE)
    n_valid = torch.tensor([70], dtype=torch.int32, device=DEVICE)
    for n_queries in (1, 20, 140):  # 2 heads a group: 2, 40 and 280 rows
        q = torch.randn(1, 4, n_queries, 32, device=DEVICE)
        got = triton_memory.unit_mass(q, reps, kind="dot", scale=0.2, n_valid=n_valid)
        want = reference.unit_mass(q, reps, kind="dot", scale=0.2, n_valid=n_valid)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.all(got[..., 70:] == -1)


def _copy_case(dtype=torch.float16, *, src_device=DEVICE, dst_device=DEVICE):
    """A pool of 9 units, a cache of 4 slots; on a GPU, a side on the host is pinned (read or
    written in place through UVA: a tiered memory's fetch, or its captured packing)."""
    torch.manual_seed(3)

    def place(x, device):
        x = x.to(device)
        return x.pin_memory() if device == "cpu" and DEVICE == "cuda" else x

    pool = [place(torch.randn(2, 3, 9 * UNIT, 32, dtype=dtype), src_device) for _ in range(2)]
    cache = [place(torch.full((2, 3, 4 * UNIT, 32), float("nan"), dtype=dtype), dst_device)
             for _ in range(2)]  # fmt: skip
    ids = torch.randint(0, 9, (2, 3, 3), device=DEVICE)
    slots = torch.stack([torch.randperm(4, device=DEVICE)[:3] for _ in range(6)]).view(2, 3, 3)
    slots[0, 1, 2] = slots[1, 0, 0] = -1  # hits: nothing to copy
    return pool, cache, ids, slots


@pytest.mark.parametrize(("src_device", "dst_device"),
                         sorted({("cpu", DEVICE), (DEVICE, "cpu"), (DEVICE, DEVICE)}))  # fmt: skip
def test_copy_units_matches_the_reference(src_device, dst_device):
    pool, cache, ids, slots = _copy_case(src_device=src_device, dst_device=dst_device)
    want = [c.clone() for c in cache]
    reference.copy_units(*pool, ids, *want, slots, UNIT)
    triton_memory.copy_units(*pool, ids, *cache, slots, UNIT)
    for got, expected in zip(cache, want, strict=True):
        torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)
    # and the reference did what it says: slot s holds unit ids[..., j], untouched slots stay NaN
    for b, h, j in [(0, 0, 0), (1, 2, 1)]:
        s, u = int(slots[b, h, j]), int(ids[b, h, j])
        expected = pool[0][b, h, u * UNIT : (u + 1) * UNIT].to(dst_device)
        torch.testing.assert_close(want[0][b, h, s * UNIT : (s + 1) * UNIT], expected)
    assert want[0][0, 1].isnan().any(), "a -1 slot must leave the cache as it was"


def test_copy_units_refuses_rows_it_would_misread():
    pool, cache, ids, slots = _copy_case()
    with pytest.raises(ValueError, match="dense"):
        triton_memory.copy_units(pool[0].transpose(2, 3), pool[1], ids, *cache, slots, UNIT)
    with pytest.raises(ValueError, match="dtype"):
        triton_memory.copy_units(pool[0].float(), pool[1], ids, *cache, slots, UNIT)


def _tables(n_units=20, n_slots=5, batch=2, heads=3):
    slot_of = torch.full((batch, heads, n_units + 1), -1, device=DEVICE)
    unit_of = torch.full((batch, heads, n_slots + 1), -1, device=DEVICE)
    return [slot_of, unit_of, torch.full_like(unit_of, -1), torch.zeros(2, dtype=torch.long,
                                                                        device=DEVICE)]  # fmt: skip


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fetch_units_matches_the_reference_step_after_step(k):
    """The same lookups from the same tables: the same slots, copies and tables after every
    step, through fills, hits and evictions (ids drawn from few units, so that they repeat)."""
    torch.manual_seed(k)
    want, got = _tables(), _tables()
    for _ in range(40):
        ids = torch.stack([torch.randperm(9)[:k] for _ in range(6)]).view(2, 3, k).to(DEVICE)
        expected = reference.fetch_units(ids, *want)
        result = triton_memory.fetch_units(ids, *got)
        for a, b in zip(result, expected, strict=True):
            assert torch.equal(a, b)
        # the tables, but for the scratch columns masked writes go to (the step count aside)
        for a, b in zip(got[:2], want[:2], strict=True):
            assert torch.equal(a[..., :-1], b[..., :-1])
        assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    slot_of, unit_of = want[0], want[1]
    assert int(want[3][1]) == 40 * 6 * k and 0 < int(want[3][0]) < 40 * 6 * k
    for b, h in [(0, 0), (1, 2)]:  # the two maps are inverse: each held unit names its slot
        for s, u in enumerate(unit_of[b, h, :5].tolist()):
            assert u < 0 or int(slot_of[b, h, u]) == s


def _append_case(dtype, *, batch=2, heads=(4, 2), head_dim=32, capacity=12, ring=5, seed=0):
    torch.manual_seed(seed)
    n_q, n_kv = heads

    def randn(*shape, kind=dtype):
        return torch.randn(*shape, dtype=kind, device=DEVICE)

    cos, sin = _table(64, head_dim)
    return dict(
        local_k=randn(batch, n_kv, capacity, head_dim),
        local_v=randn(batch, n_kv, capacity, head_dim),
        local_mass=randn(batch, n_kv, capacity, kind=torch.float32),
        local_rotated=randn(batch, n_kv, capacity, head_dim),
        queries=randn(batch, n_q, ring, head_dim),
        counts=torch.tensor([3, 7, ring - 2], dtype=torch.int32, device=DEVICE),
        cos=cos, sin=sin, query_position=40,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_token_matches_the_reference_step_after_step(dtype):
    """Three steps into the same buffers (the ring wraps round), from inputs laid out as a
    model's projections give them (heads a transposed view); every buffer and count equal."""
    want, got = _append_case(dtype), _append_case(dtype)
    for step in range(3):
        torch.manual_seed(100 + step)
        k, v = (torch.randn(2, 1, 2, 32, dtype=dtype, device=DEVICE).transpose(1, 2)
                for _ in range(2))  # fmt: skip
        q = torch.randn(2, 1, 4, 32, dtype=dtype, device=DEVICE).transpose(1, 2)
        reference.append_token(k, v, q, **want)
        triton_memory.append_token(k, v, q, **got)
        for name in ("local_k", "local_v", "local_mass", "counts"):
            assert torch.equal(got[name], want[name]), name
        for name in ("local_rotated", "queries"):  # fp32 products, one rounding to the dtype
            tolerance = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got[name], want[name], atol=tolerance, rtol=tolerance)
    assert want["counts"].tolist() == [6, 7, 1]  # three tokens more, the ring of 5 went round
    # The reference against first principles: slot 3's key rotated to position 3, unchanged rows.
    fresh = _append_case(dtype)
    reference.append_token(k, v, q, **fresh)
    cos, sin = fresh["cos"], fresh["sin"]
    expected = reference.rope(k.float(), cos[3], sin[3]).to(dtype)
    assert torch.equal(fresh["local_rotated"][:, :, 3:4], expected)
    assert torch.equal(fresh["local_k"][:, :, 3:4], k) and torch.equal(
        fresh["local_v"][:, :, 3:4], v
    )
    assert (fresh["local_mass"][:, :, 3] == 0).all()
    untouched = _append_case(dtype)
    assert torch.equal(fresh["local_k"][:, :, :3], untouched["local_k"][:, :, :3])
    expected_q = reference.rope(q.float(), cos[40], sin[40]).to(dtype)
    assert torch.equal(fresh["queries"][:, :, 3:4], expected_q)  # the ring's slot 3 of 5


def test_append_token_refuses_several_tokens():
    case = _append_case(torch.float32)
    k = torch.randn(2, 2, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one token"):
        triton_memory.append_token(k, k, torch.randn(2, 4, 1, 32, device=DEVICE), **case)


@pytest.mark.parametrize("n_units", [5, 70, 300])
@pytest.mark.parametrize("k", [1, 5])
def test_top_units_ranks_like_the_reference(n_units, k):
    """The ranking kernel chooses the reference's units: ascending, or by rank (largest mass
    first) where order does not matter; ties go to the lower id; spare capacity (-1) last."""
    torch.manual_seed(n_units + k)
    mass = torch.rand(2, 3, n_units, device=DEVICE)
    mass[0, 0, -2:] = -1.0  # spare capacity
    want = reference.top_units(mass, k)
    assert torch.equal(triton_memory.top_units(mass, k), want)
    by_rank = triton_memory.top_units(mass, k, ascending=False)
    assert torch.equal(by_rank, _ranked_with_ties_to_the_lower_id(mass, k))
    assert torch.equal(by_rank.sort(-1).values, want)
    chosen = mass.gather(-1, by_rank)
    assert torch.all(chosen[..., :-1] >= chosen[..., 1:])  # largest first
    tied = torch.zeros(1, 1, n_units, device=DEVICE)
    assert triton_memory.top_units(tied, k, ascending=False).tolist() == [[list(range(k))]]


# Segments then their candidates (600 units: at k=100 the last segment is short of k), and
# segments, candidates, then theirs (5,000 units at k=32: 20 segments, 640 candidates, 3 segments).
@pytest.mark.parametrize(("n_units", "k"), [(600, 5), (600, 100), (1100, 32), (5000, 32)])
def test_top_units_by_segments_ranks_like_the_reference(n_units, k):
    """Beyond one launch, each segment keeps its top k and the candidates are ranked again: the
    same units and order as ranking all at once, ties (whole segments of them) to the lower id."""
    assert triton_memory.RANK_ONE_LAUNCH_MAX == 512 and triton_memory.RANK_SEGMENT == 256
    torch.manual_seed(n_units + k)
    mass = torch.rand(2, 2, n_units, device=DEVICE)
    mass[0, 0, -300:] = -1.0  # spare capacity, past the last unit
    mass[1, 0] = torch.randint(0, 3, (n_units,), device=DEVICE).float()  # many ties
    mass[1, 1, 10:] = 0.5  # a segment's top k equal to the next one's
    mass[1, 1, :10] = 0.25
    by_rank = triton_memory.top_units(mass, k, ascending=False)
    assert torch.equal(by_rank, _ranked_with_ties_to_the_lower_id(mass, k))
    want = _ranked_with_ties_to_the_lower_id(mass, k).sort(-1).values
    assert torch.equal(triton_memory.top_units(mass, k), want)


def _ranked_with_ties_to_the_lower_id(mass: torch.Tensor, k: int) -> torch.Tensor:
    """The top k by mass, largest first, equal masses by id: a stable sort (torch's topk may
    break ties either way)."""
    return torch.sort(mass, dim=-1, descending=True, stable=True).indices[..., :k]
