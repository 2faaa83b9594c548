"""Tests for kava_dist.eviction against an independent loop-based reference (spec section 4)."""

import math

import pytest
import torch

from kava_dist.eviction import METHODS, EvictionResult, evict, score_tokens

SCORED = [("rkv", 0.1), ("rkv", 0.5), ("rkv", 0.0), ("rkv", 1.0),
          ("attention", None), ("redundancy", None)]


# --------------------------------------------------------------------------- reference

def ref_scores(k, q, cot, amask, lam, method, pool):
    """Plain loops over b and h, explicit slicing of the valid positions, float64.

    Returns out[b][h] = {cot position: score}.
    """
    B, H, N, D = k.shape
    G = q.shape[1] // H
    out = []
    for b in range(B):
        pos = [n for n in range(N) if bool(cot[b, n])]
        ans = [a for a in range(q.shape[2]) if bool(amask[b, a])]
        row = []
        for h in range(H):
            if not pos:
                row.append({})
                continue
            kc = k[b, h, pos].double()  # [n_valid, D]
            nv = len(pos)
            # importance
            imp = torch.zeros(nv, dtype=torch.float64)
            for a in ans:
                per_head = []
                for g in range(G):
                    qh = q[b, h * G + g, a].double()  # query head h*G+g -> kv head h
                    per_head.append(torch.stack([qh @ kc[j] for j in range(nv)]) / math.sqrt(D))
                if pool == "max":
                    pooled = torch.stack(per_head).max(dim=0).values
                    imp += torch.softmax(pooled, dim=0)
                else:
                    for lg in per_head:
                        imp += torch.softmax(lg, dim=0) / G
            if ans:
                imp /= len(ans)
            # redundancy
            kn = kc / (kc.norm(dim=-1, keepdim=True) + 1e-8)
            cos = kn @ kn.T
            for i in range(nv):
                cos[i, i] = 0.0
            cos_score = torch.zeros(nv, dtype=torch.float64)
            for j in range(nv):
                for i in range(nv):
                    cos_score[j] += -cos[i, j]
            cos_score /= nv
            red = torch.softmax(cos_score, dim=0)
            if method == "rkv":
                s = lam * imp + (1 - lam) * red
            elif method == "attention":
                s = imp
            else:
                s = red
            row.append({p: float(x) for p, x in zip(pos, s)})
        out.append(row)
    return out


def ref_select(scores, M, order):
    """Top-min(M, n_valid) by score (ties -> lower position); padded with -1 to M."""
    ranked = sorted(scores.items(), key=lambda pv: (-pv[1], pv[0]))[:M]
    picked = [p for p, _ in ranked]
    if order == "position":
        picked.sort()
    return picked + [-1] * (M - len(picked))


def assert_separated(scores, M, tol=1e-6):
    """Guard: the test data must not have near-ties in the top M+1 (else pick a new seed)."""
    vals = sorted(scores.values(), reverse=True)[: M + 1]
    for x, y in zip(vals, vals[1:]):
        assert x - y > tol, f"near tie in test data ({x} vs {y}); change the seed"


def make_case(seed, G, n_c, n_a, N=12, A=5, H=2, D=8, scattered=False):
    g = torch.Generator().manual_seed(seed)
    B = len(n_c)
    common = torch.randn(D, generator=g)
    k = torch.randn(B, H, N, D, generator=g) + 0.7 * common
    v = torch.randn(B, H, N, D, generator=g)
    q = 2.0 * torch.randn(B, H * G, A, D, generator=g)
    cot = torch.zeros(B, N, dtype=torch.bool)
    ans = torch.zeros(B, A, dtype=torch.bool)
    for b in range(B):
        if scattered:
            cot[b, torch.randperm(N, generator=g)[: n_c[b]]] = True
            ans[b, torch.randperm(A, generator=g)[: n_a[b]]] = True
        else:
            cot[b, : n_c[b]] = True
            ans[b, : n_a[b]] = True
    return k, v, q, cot, ans


N_C = [12, 8, 5, 3, 0, 1, 7]
N_A = [5, 3, 1, 2, 4, 0, 5]


# --------------------------------------------------------------------------- vs reference

@pytest.mark.parametrize("method,lam", SCORED)
@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("order", ["position", "score"])
def test_matches_reference(method, lam, pool, G, scattered, order):
    M = 5
    k, v, q, cot, ans = make_case(1234 + G + 7 * scattered, G, N_C, N_A, scattered=scattered)
    lam_ = 0.1 if lam is None else lam
    ref = ref_scores(k, q, cot, ans, lam_, method, pool)
    res = evict(k, v, q, cot, ans, M, lam=lam_, method=method, gqa_pool=pool, order=order)
    assert isinstance(res, EvictionResult)
    B, H, N, D = k.shape
    assert res.k_sel.shape == (B, H, M, D) and res.v_sel.shape == (B, H, M, D)
    assert res.valid.shape == (B, H, M) and res.index.shape == (B, H, M)
    assert res.index.dtype == torch.int64 and res.valid.dtype == torch.bool

    s = score_tokens(k, q, cot, ans, lam_, method, pool)
    assert s.dtype == torch.float32 and s.shape == (B, H, N)
    for b in range(B):
        for h in range(H):
            want = ref[b][h]
            if not (method == "attention" and N_A[b] == 0):  # all-zero I: ties by design
                assert_separated(want, M)
            for n in range(N):
                if n in want:
                    assert s[b, h, n].item() == pytest.approx(want[n], rel=1e-5, abs=1e-7)
                else:
                    assert s[b, h, n].item() == float("-inf")
            assert res.index[b, h].tolist() == ref_select(want, M, order), (b, h)
            for m, p in enumerate(res.index[b, h].tolist()):
                if p >= 0:
                    assert res.valid[b, h, m]
                    assert torch.equal(res.k_sel[b, h, m], k[b, h, p])
                    assert torch.equal(res.v_sel[b, h, m], v[b, h, p])
                else:
                    assert not res.valid[b, h, m]
                    assert torch.all(res.k_sel[b, h, m] == 0) and torch.all(res.v_sel[b, h, m] == 0)


# --------------------------------------------------------------------------- hand-computed

def test_hand_computed_tiny_case():
    # B=1, H=1, N=4 (+1 pad with a huge key), A=1, D=2.
    # keys k0=(1,0) k1=(1,0) k2=(0,1) k3=(-1,0); query q=(sqrt2*ln2, 0).
    # Importance: logits q.k/sqrt2 = [ln2, ln2, 0, -ln2] -> exp [2, 2, 1, 1/2], sum 11/2
    #   I = [4/11, 4/11, 2/11, 1/11].
    # Redundancy: cos (diag 0): c01=1, c02=0, c03=-1, c12=0, c13=-1, c23=0.
    #   column sums [0, 0, 0, -2] -> cos_score = -colsum/4 = [0, 0, 0, 1/2]
    #   R = [1, 1, 1, e^.5] / (3 + e^.5) = [0.21511, 0.21511, 0.21511, 0.35466].
    # rkv (lam=0.1): S = 0.1 I + 0.9 R = [0.22996, 0.22996, 0.21178, 0.32829].
    # Top-3: {0, 1, 3}; score order [3, 0, 1] (0/1 tie -> lower position first).
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [500.0, 0.0]])
    k = k.view(1, 1, 5, 2)
    v = torch.arange(10, dtype=torch.float32).view(1, 1, 5, 2)
    q = torch.tensor([math.sqrt(2) * math.log(2), 0.0]).view(1, 1, 1, 2)
    cot = torch.tensor([[True, True, True, True, False]])
    ans = torch.tensor([[True]])
    I = torch.tensor([4 / 11, 4 / 11, 2 / 11, 1 / 11])
    e = math.exp(0.5)
    R = torch.tensor([1, 1, 1, e]) / (3 + e)
    S = 0.1 * I + 0.9 * R
    inf = torch.tensor([float("-inf")])
    got_i = score_tokens(k, q, cot, ans, method="attention")[0, 0]
    got_r = score_tokens(k, q, cot, ans, method="redundancy")[0, 0]
    got_s = score_tokens(k, q, cot, ans, lam=0.1, method="rkv")[0, 0]
    torch.testing.assert_close(got_i, torch.cat([I, inf]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_r, torch.cat([R, inf]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_s, torch.cat([S, inf]), rtol=1e-6, atol=1e-7)
    assert got_s[:4].tolist() == pytest.approx([0.22996, 0.22996, 0.21178, 0.32829], abs=1e-5)

    res = evict(k, v, q, cot, ans, 3, order="position")
    assert res.index[0, 0].tolist() == [0, 1, 3]
    assert torch.equal(res.v_sel[0, 0], torch.tensor([[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]))
    assert evict(k, v, q, cot, ans, 3, order="score").index[0, 0].tolist() == [3, 0, 1]
    assert evict(k, v, q, cot, ans, 1, method="redundancy").index[0, 0].tolist() == [3]
    assert evict(k, v, q, cot, ans, 1, method="attention").index[0, 0].tolist() == [0]


def test_hand_computed_gqa_pooling():
    # Same 4 keys; two query heads for one kv head (G=2):
    #   head a = (sqrt2*ln2, 0): logits [ln2, ln2, 0, -ln2]
    #   head b = (0, sqrt2*ln2): logits [0, 0, ln2, 0]
    # max pool: [ln2, ln2, ln2, 0] -> exp [2,2,2,1] -> I = [2/7, 2/7, 2/7, 1/7]
    # mean pool: (softmax_a + softmax_b)/2 = ([4,4,2,1]/11 + [1,1,2,1]/5)/2
    #          = [31, 31, 32, 16] / 110
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]).view(1, 1, 4, 2)
    c = math.sqrt(2) * math.log(2)
    q = torch.tensor([[c, 0.0], [0.0, c]]).view(1, 2, 1, 2)
    cot = torch.ones(1, 4, dtype=torch.bool)
    ans = torch.ones(1, 1, dtype=torch.bool)
    got_max = score_tokens(k, q, cot, ans, method="attention", gqa_pool="max")[0, 0]
    got_mean = score_tokens(k, q, cot, ans, method="attention", gqa_pool="mean")[0, 0]
    torch.testing.assert_close(got_max, torch.tensor([2, 2, 2, 1]) / 7.0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_mean, torch.tensor([31, 31, 32, 16]) / 110.0,
                               rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- crop / random

def test_crop_picks_first_valid_positions():
    k, v, q, cot, ans = make_case(5, 2, N_C, N_A, scattered=True)
    M = 5
    res = evict(k, v, q, cot, ans, M, method="crop")
    for b in range(k.shape[0]):
        first = [n for n in range(k.shape[2]) if cot[b, n]][:M]
        for h in range(k.shape[1]):
            assert res.index[b, h].tolist() == first + [-1] * (M - len(first))
    res_s = evict(k, v, q, cot, ans, M, method="crop", order="score")
    assert torch.equal(res_s.index, res.index)


def test_random_deterministic_seeded_and_pad_free():
    N_c = [40, 30, 3, 0]
    k, v, q, cot, ans = make_case(6, 1, N_c, [2, 2, 2, 2], N=40, scattered=True)
    M = 8
    r1 = evict(k, v, None, cot, None, M, method="random", seed=3)
    r2 = evict(k, v, None, cot, None, M, method="random", seed=3)
    r3 = evict(k, v, None, cot, None, M, method="random", seed=4)
    assert torch.equal(r1.index, r2.index) and torch.equal(r1.k_sel, r2.k_sel)
    assert not torch.equal(r1.index, r3.index)
    for r in (r1, r3):
        for b in range(len(N_c)):
            for h in range(k.shape[1]):
                idx = [p for p in r.index[b, h].tolist() if p >= 0]
                assert len(idx) == min(M, N_c[b]) == len(set(idx))
                assert all(bool(cot[b, p]) for p in idx)
                assert idx == sorted(idx)
    # not just the first M positions
    assert r1.index[0, 0].tolist() != list(range(M))


# --------------------------------------------------------------------------- pads

def test_pads_never_selected_even_when_they_would_win():
    torch.manual_seed(0)
    B, H, G, N, A, D, M = 4, 2, 3, 10, 3, 8, 4
    u = torch.zeros(D)
    u[0] = 1.0
    k = torch.randn(B, H, N, D) * 0.1 + torch.eye(D)[1]  # valid keys point along e1
    v = torch.randn(B, H, N, D)
    q = (50.0 * u).expand(B, H * G, A, D).clone()        # queries point along e0
    cot = torch.ones(B, N, dtype=torch.bool)
    n_c = [2, 6, 9, 0]
    for b in range(B):
        cot[b, n_c[b]:] = False
        cot[b, 0] = n_c[b] > 0 and cot[b, 0]
    cot[2, 3] = False  # one scattered pad in the middle
    pad = ~cot
    k[pad[:, None, :].expand(B, H, N)] = torch.randn(D) * 0.01 + 1e3 * u - 1e3 * torch.eye(D)[1]
    ans = torch.ones(B, A, dtype=torch.bool)

    # control: if pads were treated as valid they would take the top slots
    everything = torch.ones_like(cot)
    for method in ("rkv", "attention", "redundancy"):
        s = score_tokens(k, q, everything, ans, 0.1, method, "max")
        top = s[1, 0].topk(2).indices.tolist()
        assert all(bool(pad[1, p]) for p in top), method

    for method in METHODS:
        for order in ("position", "score"):
            res = evict(k, v, q, cot, ans, M, method=method, order=order)
            for b in range(B):
                for h in range(H):
                    idx = res.index[b, h].tolist()
                    kept = [p for p in idx if p >= 0]
                    assert len(kept) == min(M, int(cot[b].sum()))
                    assert all(bool(cot[b, p]) for p in kept), (method, b, h, idx)
                    assert idx[: len(kept)] == kept  # valid slots first
            assert torch.isfinite(res.k_sel).all() and torch.isfinite(res.v_sel).all()


# --------------------------------------------------------------------------- short CoT / order

@pytest.mark.parametrize("short_cot", ["mask", "zero_target"])
def test_short_cot_modes(short_cot):
    k, v, q, cot, ans = make_case(7, 2, [3, 9, 0], [2, 2, 2])
    M = 5
    res = evict(k, v, q, cot, ans, M, short_cot=short_cot)
    assert (res.index[0] >= 0).sum(-1).tolist() == [3, 3]
    assert torch.all(res.index[0, :, 3:] == -1) and torch.all(res.index[2] == -1)
    assert torch.all(res.k_sel[0, :, 3:] == 0) and torch.all(res.v_sel[0, :, 3:] == 0)
    assert torch.all(res.k_sel[2] == 0)
    if short_cot == "mask":
        assert torch.equal(res.valid, res.index >= 0)
        assert res.valid[0, :, :3].all() and not res.valid[0, :, 3:].any()
    else:
        assert res.valid.all()


def test_order_position_vs_score():
    k, v, q, cot, ans = make_case(8, 4, [12, 3, 7], [3, 3, 3])
    M = 5
    rp = evict(k, v, q, cot, ans, M, order="position")
    rs = evict(k, v, q, cot, ans, M, order="score")
    s = score_tokens(k, q, cot, ans, 0.1, "rkv", "max")
    for b in range(3):
        for h in range(k.shape[1]):
            ip = [p for p in rp.index[b, h].tolist() if p >= 0]
            isc = [p for p in rs.index[b, h].tolist() if p >= 0]
            assert sorted(ip) == sorted(isc) and ip == sorted(ip)
            vals = [s[b, h, p].item() for p in isc]
            assert vals == sorted(vals, reverse=True)
            for m, p in enumerate(isc):
                assert torch.equal(rs.k_sel[b, h, m], k[b, h, p])
    assert not torch.equal(rp.index, rs.index)


def test_span_shorter_than_budget_and_empty_examples():
    k, v, q, cot, ans = make_case(9, 2, [3, 2, 0], [2, 2, 2], N=3)
    res = evict(k, v, q, cot, ans, 5)
    assert res.index.shape == (3, 2, 5)
    assert sorted(res.index[0, 0].tolist()[:3]) == [0, 1, 2]
    assert res.index[0, 0].tolist()[3:] == [-1, -1]
    assert (res.index[1] >= 0).sum(-1).tolist() == [2, 2]
    assert torch.all(res.index[2] == -1) and not res.valid[2].any()
    s = score_tokens(k, q, cot, ans)
    assert not torch.isnan(s).any() and torch.all(s[2] == float("-inf"))
    assert not torch.isnan(res.k_sel).any()
    # zero-length span
    k0 = k[:, :, :0]
    r0 = evict(k0, k0.clone(), q, cot[:, :0], ans, 4)
    assert r0.k_sel.shape == (3, 2, 4, 8) and torch.all(r0.index == -1)


# --------------------------------------------------------------------------- dtype / folding

@pytest.mark.parametrize("method", ["rkv", "crop"])
def test_bf16_entries_bit_exact(method):
    k, v, q, cot, ans = make_case(10, 4, [12, 4, 9], [3, 2, 5])
    kb, vb, qb = k.bfloat16(), (v * 3.3).bfloat16(), q.bfloat16()
    res = evict(kb, vb, qb, cot, ans, 5, method=method)
    assert res.k_sel.dtype == torch.bfloat16 and res.v_sel.dtype == torch.bfloat16
    for b in range(3):
        for h in range(k.shape[1]):
            for m, p in enumerate(res.index[b, h].tolist()):
                if p >= 0:
                    assert torch.equal(res.k_sel[b, h, m], kb[b, h, p])
                    assert torch.equal(res.v_sel[b, h, m], vb[b, h, p])
                else:
                    assert torch.all(res.k_sel[b, h, m] == 0)


@pytest.mark.parametrize("method,pool", [("rkv", "max"), ("rkv", "mean"), ("attention", "max"),
                                         ("redundancy", "max"), ("crop", "max")])
def test_folding_layers_into_batch(method, pool):
    L, n_c, n_a = 3, [12, 4, 0, 7], [3, 1, 2, 3]
    layers = [make_case(100 + l, 4, n_c, n_a) for l in range(L)]
    _, _, _, cot, ans = layers[0]
    per = [evict(k, v, q, cot, ans, 5, method=method, gqa_pool=pool) for k, v, q, _, _ in layers]
    kf = torch.cat([x[0] for x in layers])
    vf = torch.cat([x[1] for x in layers])
    qf = torch.cat([x[2] for x in layers])
    fold = evict(kf, vf, qf, cot.repeat(L, 1), ans.repeat(L, 1), 5, method=method, gqa_pool=pool)
    for i, name in enumerate(EvictionResult._fields):
        assert torch.equal(fold[i], torch.cat([r[i] for r in per])), name


# --------------------------------------------------------------------------- validation

def test_argument_errors_name_the_fix():
    k, v, q, cot, ans = make_case(11, 2, [4, 4], [2, 2])
    with pytest.raises(ValueError, match="rkv"):
        evict(k, v, q, cot, ans, 3, method="h2o")
    with pytest.raises(ValueError, match="gqa_pool"):
        evict(k, v, q, cot, ans, 3, gqa_pool="sum")
    with pytest.raises(ValueError, match="order"):
        evict(k, v, q, cot, ans, 3, order="random")
    with pytest.raises(ValueError, match="short_cot"):
        evict(k, v, q, cot, ans, 3, short_cot="pad")
    with pytest.raises(ValueError, match="budget"):
        evict(k, v, q, cot, ans, 0)
    with pytest.raises(ValueError, match="multiple"):
        evict(k, v, q[:, :3], cot, ans, 3)
    with pytest.raises(ValueError, match="cot_mask"):
        evict(k, v, q, cot[:, :5], ans, 3)
    with pytest.raises(ValueError, match="answer_mask"):
        evict(k, v, q, cot, ans[:, :1], 3)
    with pytest.raises(ValueError, match="v shape"):
        evict(k, v[:, :, :4], q, cot, ans, 3)
    with pytest.raises(ValueError, match="q_answer"):
        evict(k, v, q[..., :4], cot, ans, 3)
    with pytest.raises(TypeError, match=r"\.bool\(\)"):
        evict(k, v, q, cot.long(), ans, 3)
    with pytest.raises(ValueError, match="lam"):
        evict(k, v, q, cot, ans, 3, lam=1.5)


def test_shared_selection_keeps_one_set_of_positions_per_example():
    """eviction.share=all: every layer and KV head of an example keeps the same CoT positions (the top of the
    pooled score); heads: the same within a layer; none: R-KV's own per-head choice, which differs here."""
    from kava_dist.eviction import shared_scores

    torch.manual_seed(0)
    L, B, H, N, D, M = 3, 2, 2, 10, 8, 4
    k, v, q = torch.randn(L * B, H, N, D), torch.randn(L * B, H, N, D), torch.randn(L * B, 2 * H, 3, D)
    cot = torch.ones(L * B, N, dtype=torch.bool)
    cot[1::B, 7:] = False                                   # example 1 has a shorter CoT
    ans = torch.ones(L * B, 3, dtype=torch.bool)
    sc = score_tokens(k, q, cot, ans).view(L, B, H, N)
    idx = {s: evict(k, v, q, cot, ans, M, score_BHN=shared_scores(sc, s).flatten(0, 1)).index.view(L, B, H, M)
           for s in ("none", "heads", "all")}
    assert torch.equal(idx["none"].flatten(0, 1), evict(k, v, q, cot, ans, M).index)
    assert not (idx["none"] == idx["none"][:, :, :1]).all()
    assert (idx["heads"] == idx["heads"][:, :, :1]).all() and not (idx["heads"] == idx["heads"][:1]).all()
    assert (idx["all"] == idx["all"][:1, :, :1]).all()
    assert (idx["all"][:, 1] < 7).all()                     # pads are never kept
    pooled = sc.mean(dim=(0, 2))                            # the kept positions are the pooled top-M
    for b in range(B):
        top = torch.sort(pooled[b], descending=True, stable=True).indices[:M]
        assert sorted(idx["all"][0, b, 0].tolist()) == sorted(top.tolist())
