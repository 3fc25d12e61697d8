"""CPU figures, side by side in one process: our reference path (impl="torch", eager and under --compile) against a
plain restatement of the reference project's compiled CPU path, and our engine's decode step against a contiguous
KV cache.

    python -m bench.cpu                       # depth 4 and 8, T 256 and 512 (2048 tokens a step), decode 1/8/32
    python -m bench.cpu --budget 900 --threads 1
    python -m bench.cpu --dry-run             # tiny shapes, compile through the "eager" backend: seconds

Training step (one micro-batch of 2048 tokens, then the optimizer step and zero_grad, fp32 weights and tables):
    ours_eager     engine.gpt.build_model(impl="torch") + train.optim.MuonAdamW(impl="torch")
    ours_compiled  the same after GPT.compile_reference() and with MuonAdamW(compile=True): what --compile runs
    restated       the same model math written plainly (full N x V softcapped logits, F.cross_entropy) under
                   torch.compile(model, dynamic=False), AdamW per tensor and Muon per whole group stack each one
                   compiled function with 0-D tensor hyperparameters (dynamic=False): how the reference compiles its
                   model and its fused optimizer steps on a CPU
Evaluation: the no-grad forward with per-token losses of the same three. Decode: one engine.step() with B
greedy requests running (after a prompt of --prompt-len tokens) against the reference engine's step restated: a
plain eager forward over a contiguous (L, B, T, H, D) cache, then its temperature-0 sampling (argmax, tokens to
the host) feeding the next step. Each timed unit alternates its variants, --reps (--decode-reps) times; medians,
with min and max as the spread. The first call of each variant (compilation included) is reported as warm-up
seconds. The machine may be shared: the spread says how much. The result goes to
bench/results/cpu_<device>_<time>.json (bench.common).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tritonchat.bench.common import median, write_result
from tritonchat.kernels.attention import attention_mask
from tritonchat.kernels.muon import muon_step_ref

TOKENS = 2048


# ---- the restatement: the same math, written plainly --------------------------------------------------------------
def _rope(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Restated(nn.Module):
    """A copy of a GPT's weights with a plain forward: (idx, targets) -> loss (mean or per token), or with a
    contiguous cache one decode step -> logits."""

    def __init__(self, gpt) -> None:
        super().__init__()
        self.g = copy.deepcopy(gpt)
        T = gpt.config.sequence_len
        self.masks = {w: attention_mask(T, T, w) for w in set(gpt.windows) if w < T}

    def block(self, i, x, x0, idx, cos, sin, kv=None):
        g, C = self.g, self.g.config.n_embd
        blk, B, T = g.transformer.h[i], x.size(0), x.size(1)
        H, Hkv, D = g.config.n_head, g.config.n_kv_head, C // g.config.n_head
        x = g.resid_lambdas[i] * x + g.x0_lambdas[i] * x0
        xn = F.rms_norm(x, (C,))
        a = blk.attn
        q = F.linear(xn, a.c_q.weight).view(B, T, H, D)
        k = F.linear(xn, a.c_k.weight).view(B, T, Hkv, D)
        v = F.linear(xn, a.c_v.weight).view(B, T, Hkv, D)
        if a.ve_gate is not None:
            gate = 3 * torch.sigmoid(F.linear(xn[..., :12], a.ve_gate.weight))
            v = v + gate.unsqueeze(-1) * g.value_embeds[str(i)](idx).view(B, T, Hkv, D)
        q = F.rms_norm(_rope(q, cos, sin), (D,)) * 1.2
        k = F.rms_norm(_rope(k, cos, sin), (D,)) * 1.2
        if kv is None:
            w = g.windows[i]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if w in self.masks:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[w])
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # decode: write this token at `pos`, attend over the window of the cache
            kc, vc, pos = kv
            kc[i, :, pos], vc[i, :, pos] = k[:, 0], v[:, 0]
            lo = max(0, pos + 1 - g.windows[i] - 1)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), kc[i, :, lo:pos + 1].transpose(1, 2),
                                               vc[i, :, lo:pos + 1].transpose(1, 2))
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), a.c_proj.weight)
        h = F.relu(F.linear(F.rms_norm(x, (C,)), blk.mlp.c_fc.weight)).square()
        return x + F.linear(h, blk.mlp.c_proj.weight)

    def forward(self, idx, targets, reduction: str = "mean"):
        g, C, T = self.g, self.g.config.n_embd, idx.size(1)
        cos, sin = g.cos[:, :T], g.sin[:, :T]
        x = F.rms_norm(g.transformer.wte(idx).float(), (C,))
        gate = g.smear_lambda * torch.sigmoid(F.linear(x[:, 1:, :24], g.smear_gate.weight))
        x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, mid, L = x, None, g.config.n_layer
        for i in range(L):
            x = self.block(i, x, x0, idx, cos, sin)
            mid = x if i == L // 2 else mid
        x = F.rms_norm(x - g.backout_lambda * mid, (C,)) if mid is not None else F.rms_norm(x, (C,))
        V = g.config.vocab_size
        logits = F.linear(x, g.lm_head.weight)[..., :V].float()
        logits = 15.0 * torch.tanh(logits / 15.0)
        loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1, reduction=reduction)
        return loss if reduction != "none" else loss.view(targets.shape)

    @torch.no_grad()
    def decode(self, tok, prev, pos, kc, vc):
        """tok, prev (B,) this and the previous token; pos: the position of tok. Returns softcapped logits (B, V)."""
        g, C = self.g, self.g.config.n_embd
        cos, sin = g.cos[:, pos:pos + 1], g.sin[:, pos:pos + 1]
        idx = tok[:, None]
        x = F.rms_norm(g.transformer.wte(idx).float(), (C,))
        xp = F.rms_norm(g.transformer.wte(prev[:, None]).float(), (C,))
        x = x + g.smear_lambda * torch.sigmoid(F.linear(x[..., :24], g.smear_gate.weight)) * xp
        x0, mid, L = x, None, g.config.n_layer
        for i in range(L):
            x = self.block(i, x, x0, idx, cos, sin, (kc, vc, pos))
            mid = x if i == L // 2 else mid
        x = F.rms_norm(x - g.backout_lambda * mid, (C,)) if mid is not None else F.rms_norm(x, (C,))
        return 15.0 * torch.tanh(F.linear(x[:, 0], g.lm_head.weight)[:, :g.config.vocab_size] / 15.0)


def _adamw_fused(p, grad, m, v, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    """The reference's fused AdamW, restated: one compiled function, 0-D tensor hyperparameters."""
    p.mul_(1 - lr_t * wd_t)
    m.lerp_(grad, 1 - beta1_t)
    v.lerp_(grad.square(), 1 - beta2_t)
    denom = (v / (1 - beta2_t ** step_t)).sqrt() + eps_t
    p.add_(m / denom * (-lr_t / (1 - beta1_t ** step_t)))


class RestatedOptimizer:
    """The reference's CPU optimizer step, restated over our param groups: AdamW per tensor, Muon per whole group
    (one stack of every matrix of a shape), each one compiled call (muon_step_ref is the same Muon math)."""

    def __init__(self, groups) -> None:
        self.groups, self.state, self.t = groups, {}, 0
        self.adamw = torch.compile(_adamw_fused, dynamic=False, fullgraph=True)
        self.muon = torch.compile(muon_step_ref, dynamic=False)
        for grp in groups:
            for p in grp["params"]:
                if grp["kind"] == "adamw":
                    self.state[p] = (torch.zeros_like(p), torch.zeros_like(p))
        for grp in groups:
            if grp["kind"] == "muon":
                ps = grp["params"]
                m, n = ps[0].shape
                buf2 = torch.zeros((len(ps), m, 1) if m >= n else (len(ps), 1, n))
                self.state[id(grp)] = (torch.zeros((len(ps), m, n)), buf2)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        t = lambda x: torch.tensor(float(x))  # noqa: E731
        for grp in self.groups:
            if grp["kind"] == "adamw":
                b1, b2 = grp["betas"]
                for p in grp["params"]:
                    m, v = self.state[p]
                    self.adamw(p, p.grad, m, v, t(self.t), t(grp["lr"]), t(b1), t(b2), t(grp["eps"]),
                               t(grp["weight_decay"]))
            else:
                ps = grp["params"]
                buf, buf2 = self.state[id(grp)]
                P = torch.stack(list(ps))
                self.muon(torch.stack([p.grad for p in ps]), P, buf, buf2, lr=t(grp["lr"]), mu=t(grp["momentum"]),
                          beta2=t(grp["beta2"]), wd=t(grp["weight_decay"]), ns_steps=5, ns_dtype=torch.float32)
                torch._foreach_copy_(list(ps), list(P.unbind(0)))


# ---- the units ----------------------------------------------------------------------------------------------------
def _build(depth: int, T: int, vocab: int):
    from tritonchat.engine.gpt import GPTConfig, build_model

    torch.manual_seed(0)
    return build_model(GPTConfig.from_depth(depth, sequence_len=T, vocab_size=vocab), impl="torch")


def _groups(model):
    from tritonchat.train.optim import build_param_groups

    return build_param_groups(model, 0.008, 0.3, 0.02, 0.5, 0.2)


def _alternate(fns: dict, reps: int, deadline: float) -> dict:
    """{name: {"warmup_s", "median_s", "min_s", "max_s", "reps"}}: one untimed call each (compilation), then reps
    rounds of one call each, in turn; stops early at the deadline (after at least one round)."""
    out = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        out[name] = {"warmup_s": time.perf_counter() - t0, "times": []}
    for r in range(reps):
        if r and time.perf_counter() > deadline:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name]["times"].append(time.perf_counter() - t0)
    for rec in out.values():
        ts = rec.pop("times")
        rec.update(median_s=median(ts), min_s=min(ts), max_s=max(ts), reps=len(ts))
    return out


def train_unit(depth: int, T: int, args, deadline: float) -> dict:
    from tritonchat.train.optim import MuonAdamW

    B = max(1, args.tokens // T)
    gen = torch.Generator().manual_seed(1)
    ours = _build(depth, T, args.vocab_size)
    V = ours.config.vocab_size
    x, y = (torch.randint(0, V, (B, T), generator=gen) for _ in range(2))
    comp = _build(depth, T, args.vocab_size)
    comp.compile_reference()
    rest = Restated(ours)
    rest_c = torch.compile(rest, dynamic=False)
    opts = {"ours_eager": MuonAdamW(_groups(ours)), "ours_compiled": MuonAdamW(_groups(comp), compile=True)}
    ropt = RestatedOptimizer(_groups(rest.g))
    losses = {}

    def step(name, model, opt):
        def fn():
            loss = model(x, y)
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.setdefault(name, loss.item())
        return fn

    train = _alternate({"ours_eager": step("ours_eager", ours, opts["ours_eager"]),
                        "ours_compiled": step("ours_compiled", comp, opts["ours_compiled"]),
                        "restated_compiled": step("restated_compiled", rest_c, ropt)}, args.reps, deadline)

    def ev(model):
        def fn():
            with torch.no_grad():
                model(x, y, "none") if model is rest_c else model(x, y, loss_reduction="none")
        return fn

    evals = _alternate({"ours_eager": ev(ours), "ours_compiled": ev(comp), "restated_compiled": ev(rest_c)},
                       args.reps, deadline)
    first = losses["ours_eager"]
    agree = {k: abs(v - first) / abs(first) for k, v in losses.items()}  # the same weights, the same first loss
    return {"depth": depth, "T": T, "B": B, "train": train, "eval": evals, "first_loss_rel_diff": agree,
            "speedup_ours_compiled_vs_restated": train["restated_compiled"]["median_s"]
            / train["ours_compiled"]["median_s"],
            "eval_speedup_ours_compiled_vs_restated": evals["restated_compiled"]["median_s"]
            / evals["ours_compiled"]["median_s"]}


def decode_unit(depth: int, batch: int, args, deadline: float) -> dict:
    from tritonchat.engine.engine import Engine, SamplingParams

    P = args.prompt_len
    model = _build(depth, max(P + 64, 256), args.vocab_size).eval()
    cfg = model.config
    rest = Restated(model)
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, cfg.vocab_size, (batch, P), generator=gen)
    reps = args.decode_reps
    engine = Engine(model, None, max_batch_size=batch, max_seq_len=P + reps + 8, prefill_chunk=batch * P,
                    impl="torch")
    params = SamplingParams(max_tokens=reps + 4, temperature=0.0, stop_tokens=[])
    for p in prompts.tolist():
        engine.add_request(p, params)
    while engine.num_waiting or not engine.num_running:
        engine.step()
    shape = (cfg.n_layer, batch, P + reps + 8, cfg.n_kv_head, cfg.n_embd // cfg.n_head)
    kc, vc = torch.zeros(shape), torch.zeros(shape)
    state = {"pos": P, "tok": prompts[:, -1], "prev": prompts[:, -2]}
    with torch.no_grad():  # fill the contiguous cache with the prompt (its values are not compared, only timed)
        for i in range(P):
            rest.decode(prompts[:, i], prompts[:, i - 1] if i else prompts[:, 0], i, kc, vc)

    def contiguous():  # the reference engine's step: the forward, then sample_next_token at temperature 0
        state["pos"] += 1
        logits = rest.decode(state["tok"], state["prev"], state["pos"] - 1, kc, vc)
        nxt = torch.argmax(logits, dim=-1, keepdim=True)
        state["prev"], state["tok"] = state["tok"], torch.tensor(nxt[:, 0].tolist())

    out = _alternate({"engine": engine.step, "contiguous": contiguous}, reps, deadline)
    return {"depth": depth, "batch": batch, "context": P, "decode": out,
            "ratio_engine_vs_contiguous": out["contiguous"]["median_s"] / out["engine"]["median_s"]}


@contextlib.contextmanager
def _eager_backend(on: bool):
    """--dry-run: every torch.compile in the run takes the "eager" backend (graphs captured, no C++ built)."""
    if not on:
        yield
        return
    real = torch.compile
    torch.compile = lambda fn=None, **kw: real(fn, **{**kw, "backend": "eager"})
    try:
        yield
    finally:
        torch.compile = real


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--depths", default=None, help="comma-separated (default 4,8; 1 dry)")
    p.add_argument("--seq-lens", default=None, help="comma-separated (default 256,512; 32 dry)")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens per training step (default {TOKENS}; 64 dry)")
    p.add_argument("--vocab-size", type=int, default=None, help="default 32768 (256 dry)")
    p.add_argument("--decode-batches", default=None, help="comma-separated (default 1,8,32; 2 dry)")
    p.add_argument("--decode-depth", type=int, default=None, help="default 4 (1 dry)")
    p.add_argument("--prompt-len", type=int, default=None, help="decode context (default 512; 8 dry)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per training unit (default 5; 1 dry)")
    p.add_argument("--decode-reps", type=int, default=None, help="timed decode steps per unit (default 40; 2 dry)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--budget", type=float, default=1800.0, help="seconds; units that start after it are skipped")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, the eager compile backend")
    a = p.parse_args(argv)
    for name, full, tiny in (("depths", "4,8", "1"), ("seq_lens", "256,512", "32"), ("tokens", TOKENS, 64),
                             ("vocab_size", 32768, 256), ("decode_batches", "1,8,32", "2"), ("decode_depth", 4, 1),
                             ("prompt_len", 512, 8), ("reps", 5, 1), ("decode_reps", 40, 2)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.dry_run else full)
    for name in ("depths", "seq_lens", "decode_batches"):
        setattr(a, name, [int(v) for v in str(getattr(a, name)).split(",") if v.strip()])
    return a


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("cache_size_limit", "recompile_limit"):  # every shape of every unit keeps its graphs
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    start = time.perf_counter()
    deadline = start + args.budget
    result = {"conditions": {"threads": torch.get_num_threads(), "dtype": "float32", "tokens_per_step": args.tokens,
                             "vocab_size": args.vocab_size, "dry_run": args.dry_run, "reps": args.reps,
                             "decode_reps": args.decode_reps,
                             "note": "medians of alternating runs; min/max is the spread; the machine may be shared"},
              "train": [], "decode": [], "skipped": []}
    units = [("train", d, t) for d in args.depths for t in args.seq_lens]
    units += [("decode", args.decode_depth, b) for b in args.decode_batches]
    with _eager_backend(args.dry_run):
        for kind, a, b in units:
            if (result["train"] or result["decode"]) and time.perf_counter() > deadline:
                result["skipped"].append(f"{kind} {a} {b}")
                continue
            torch._dynamo.reset()
            rec = train_unit(a, b, args, deadline) if kind == "train" else decode_unit(a, b, args, deadline)
            result[kind].append(rec)
            print(_line(kind, rec), flush=True)
    result["elapsed_s"] = time.perf_counter() - start
    path = write_result("cpu", result, args.out)
    print(f"wrote {path}")
    return result


def _line(kind: str, r: dict) -> str:
    fmt = lambda d: f"{d['median_s'] * 1e3:.0f} ms [{d['min_s'] * 1e3:.0f}-{d['max_s'] * 1e3:.0f}]"  # noqa: E731
    if kind == "train":
        tr, ev = r["train"], r["eval"]
        return (f"train d{r['depth']} T{r['T']} B{r['B']}: " + ", ".join(f"{k} {fmt(v)}" for k, v in tr.items())
                + f" | ours_compiled vs restated x{r['speedup_ours_compiled_vs_restated']:.2f}"
                + " | eval " + ", ".join(f"{k} {fmt(v)}" for k, v in ev.items())
                + f" x{r['eval_speedup_ours_compiled_vs_restated']:.2f}")
    d = r["decode"]
    return (f"decode d{r['depth']} B{r['batch']} ctx {r['context']}: engine {fmt(d['engine'])}, contiguous "
            f"{fmt(d['contiguous'])} (engine x{r['ratio_engine_vs_contiguous']:.2f})")


if __name__ == "__main__":
    main()
