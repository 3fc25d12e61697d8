"""MuonAdamW: Muon (Polar Express + NorMuon + cautious weight decay) for the block matrices, AdamW for
the rest (SPEC §6). This is the PyTorch reference path; it runs on any device.

Each parameter group has a `kind`: "adamw" (per-parameter update) or "muon" (parameters of one
shape, updated together as a (K, m, n) stack). Optimizer state is kept per parameter, so the
state_dict is the standard torch one and resumes exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tritonchat import kernels


class MuonAdamW(torch.optim.Optimizer):
    """Muon + AdamW. With `world_size > 1` (torch.distributed initialized) gradients are reduced inside
    `step`, ZeRO-2 style: a Muon stack is reduce-scattered so each rank orthogonalizes only the matrices it
    owns, then the updated matrices are all-gathered; an AdamW tensor whose first dim divides by the world
    size (and that is not tiny) is reduce-scattered and its state sharded along dim 0, the rest all-reduced.
    Every reduction is launched asynchronously up front and waited for group by group, so communication
    overlaps the compute of earlier groups. Gradients are averaged over ranks."""

    SHARD_MIN_NUMEL = 4096  # smaller AdamW tensors are all-reduced and updated whole on every rank
    CPU_STACK_NUMEL = 1 << 22  # elements of one Muon stack on a CPU (single process): 16 MB per fp32 copy

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype | None = None, impl: str = "torch",
                 rank: int = 0, world_size: int = 1, compile: bool = False) -> None:
        """ns_dtype: the dtype of the Polar-Express iterations (default bf16 on CUDA, fp32 elsewhere).
        impl: "auto" | "torch" | "triton" (kernels.resolve_impl), resolved once here for the parameters' device:
        "torch" runs the PyTorch reference math, "triton" the fused Triton kernels. compile: the reference math
        under torch.compile (AdamW one fused pass per tensor, a Muon step one graph per stack shape; no effect on
        the Triton path)."""
        for g in param_groups:
            if g.get("kind") not in ("adamw", "muon"):
                raise ValueError(f"each param group needs kind 'adamw' or 'muon', got {g.get('kind')!r}")
            if g["kind"] == "muon" and len({tuple(p.shape) for p in g["params"]}) != 1:
                raise ValueError("a muon group must hold parameters of one shape")
            g.setdefault("initial_lr", g["lr"])
        defaults = dict(lr=0.0, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, momentum=0.95, beta2=0.9, ns_steps=5)
        super().__init__(param_groups, defaults)
        if world_size > 1 and not dist.is_initialized():
            raise ValueError("world_size > 1 needs an initialized torch.distributed process group")
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self.impl = kernels.resolve_impl(impl, device)
        self.ns_dtype, self.rank, self.world_size = ns_dtype, rank, world_size
        self.compile = bool(compile)

    def _sharded(self, p: torch.Tensor) -> bool:
        W = self.world_size
        return W > 1 and p.numel() >= self.SHARD_MIN_NUMEL and p.shape[0] % W == 0

    def _muon_layout(self, K: int, offset: int) -> tuple[int, list[tuple[int, int]]]:
        """How a stack of K matrices is split: (matrices per rank, [(lo, hi) owned by rank r for each r]).
        Chunk c of `per` consecutive matrices goes to rank (c + offset) % W; rotating the offset from group to
        group spreads small stacks (K < W) over the ranks instead of piling them on rank 0."""
        W = self.world_size
        per = -(-K // W)
        spans = []
        for r in range(W):
            c = (r - offset) % W
            spans.append((min(K, c * per), min(K, (c + 1) * per)))
        return per, spans

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        if self.world_size == 1:
            for group in self.param_groups:
                if group["kind"] == "adamw":
                    for p in group["params"]:
                        if p.grad is not None:
                            self._adamw(p, p.grad, group)
                else:
                    params = [p for p in group["params"] if p.grad is not None]
                    for part in self._stack_parts(params):  # each matrix's update is its own: parts are exact
                        self._muon(part, torch.stack([p.grad.float() for p in part]), group)
            return
        self._step_distributed()

    def _stack_parts(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """`params` in consecutive parts of at most CPU_STACK_NUMEL elements on a CPU (where the stacked copies of
        gradient, momentum and weights, and Polar Express's temporaries, would otherwise cost several times the
        group's size: 2 GB at depth 12), whole on a GPU (one batched launch per group)."""
        if not params or params[0].device.type == "cuda":
            return [params] if params else []
        per = max(1, self.CPU_STACK_NUMEL // params[0].numel())
        return [params[i:i + per] for i in range(0, len(params), per)]

    def _step_distributed(self) -> None:
        W = self.world_size
        grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # every rank joins every collective
        # 1. launch every reduction, in group order
        pending, offset = [], 0
        for group in self.param_groups:
            if group["kind"] == "adamw":
                for p in group["params"]:
                    g = grad(p).float().div_(W)
                    if self._sharded(p):
                        out = torch.empty((p.shape[0] // W, *p.shape[1:]), dtype=g.dtype, device=g.device)
                        pending.append((group, p, out, dist.reduce_scatter_tensor(out, g, async_op=True)))
                    else:
                        pending.append((group, p, g, dist.all_reduce(g, async_op=True)))
            else:
                params = group["params"]
                per, spans = self._muon_layout(len(params), offset)
                offset += len(params)
                G = torch.zeros((per * W, *params[0].shape), dtype=torch.float32, device=params[0].device)
                for r, (lo, hi) in enumerate(spans):  # rank r's block of the input holds the matrices it owns
                    for j in range(lo, hi):
                        G[r * per + j - lo] = grad(params[j]).float().div_(W)
                out = torch.empty((per, *params[0].shape), dtype=torch.float32, device=G.device)
                work = dist.reduce_scatter_tensor(out, G, async_op=True)
                pending.append((group, (params, per, spans), out, work))
        # 2. update what this rank owns as each reduction lands, then launch the gathers
        gathers = []
        for group, target, g, work in pending:
            work.wait()
            if group["kind"] == "adamw":
                p = target
                if self._sharded(p):
                    rows = p.shape[0] // W
                    shard = p[self.rank * rows:(self.rank + 1) * rows].clone()
                    self._adamw(p, g, group, view=shard)
                    gathers.append((None, dist.all_gather_into_tensor(p.view(-1), shard.view(-1), async_op=True)))
                else:
                    self._adamw(p, g, group)
            else:
                params, per, spans = target
                lo, hi = spans[self.rank]
                new = torch.zeros((per, *params[0].shape), dtype=torch.float32, device=g.device)
                if hi > lo:
                    new[: hi - lo] = self._muon(params[lo:hi], g[: hi - lo], group, write=False)
                full = torch.empty((per * W, *params[0].shape), dtype=torch.float32, device=g.device)
                gathers.append(((params, per, spans, full), dist.all_gather_into_tensor(full, new, async_op=True)))
        # 3. land the gathered parameters
        for dest, work in gathers:
            work.wait()
            if dest is not None:
                params, per, spans, full = dest
                for r, (lo, hi) in enumerate(spans):
                    for j in range(lo, hi):
                        params[j].copy_(full[r * per + j - lo])

    def _adamw(self, p: torch.Tensor, grad: torch.Tensor, group: dict, view: torch.Tensor | None = None) -> None:
        """SPEC §6 AdamW (kernels.muon.adamw_step_: one fused launch on CUDA, its reference elsewhere).
        `view`: update this contiguous shard of p instead (in place)."""
        target = p if view is None else view
        state = self.state[p]
        if not state:  # moments in fp32, or bf16 beside a bf16 table (the reference's storage; what
            state["step"] = 0  # Optimizer.load_state_dict casts them to on resume)
            dtype = torch.bfloat16 if target.dtype == torch.bfloat16 else torch.float32
            state["exp_avg"] = torch.zeros_like(target, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(target, dtype=dtype)
        state["step"] += 1
        kernels.adamw_step_(target, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], state["step"],
                            group["lr"], *group["betas"], group["eps"], group["weight_decay"], impl=self.impl,
                            compiled=self.compile)

    def _muon(self, params: list[torch.Tensor], G: torch.Tensor, group: dict, write: bool = True) -> torch.Tensor:
        """One Muon step (SPEC §6: Nesterov, row equilibration, Polar Express, Muon+, NorMuon, cautious weight
        decay; kernels.muon_step_) for `params` with gradient stack G (K, m, n). Updates the params in place
        (write=True) or returns the new (K, m, n) fp32 values."""
        m, n = params[0].shape
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                vshape = (m, 1) if m >= n else (1, n)  # NorMuon reduces over the longer side
                state["second_momentum_buffer"] = torch.zeros(vshape, dtype=torch.float32, device=p.device)
        buf = torch.stack([self.state[p]["momentum_buffer"] for p in params])
        buf2 = torch.stack([self.state[p]["second_momentum_buffer"] for p in params])
        P = torch.stack([p.float() for p in params])
        kernels.muon_step_(G.contiguous(), P, buf, buf2, lr=group["lr"], mu=group["momentum"], beta2=group["beta2"],
                           wd=group["weight_decay"], ns_steps=group["ns_steps"], ns_dtype=self.ns_dtype,
                           impl=self.impl, compiled=self.compile)
        for i, p in enumerate(params):
            if write:
                p.copy_(P[i])
            self.state[p]["momentum_buffer"].copy_(buf[i])
            self.state[p]["second_momentum_buffer"].copy_(buf2[i])
        return P


def build_param_groups(model, unembedding_lr: float, embedding_lr: float, matrix_lr: float, scalar_lr: float,
                       matrix_weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """SPEC §6 groups. `lr_scale` (sqrt(B/B_ref)) scales every lr except the smear group's fixed 0.2;
    lm_head, wte and value_embeds lrs are also scaled by (C/768)^-0.5."""
    C = model.config.n_embd
    dim_scale = (C / 768) ** -0.5
    named = dict(model.named_parameters())
    ve = [p for n, p in named.items() if n.startswith("value_embeds.")]
    groups = [
        dict(kind="adamw", name="lm_head", params=[named["lm_head.weight"]],
             lr=unembedding_lr * dim_scale * lr_scale, betas=(0.8, 0.96), weight_decay=0.01, eps=1e-10),
        dict(kind="adamw", name="wte", params=[named["transformer.wte.weight"]],
             lr=embedding_lr * dim_scale * lr_scale, betas=(0.8, 0.995), weight_decay=0.001, eps=1e-10),
        dict(kind="adamw", name="value_embeds", params=ve,
             lr=0.5 * embedding_lr * dim_scale * lr_scale, betas=(0.8, 0.995), weight_decay=0.01, eps=1e-10),
        dict(kind="adamw", name="resid_lambdas", params=[named["resid_lambdas"]],
             lr=0.01 * scalar_lr * lr_scale, betas=(0.8, 0.95), weight_decay=0.05, eps=1e-10),
        dict(kind="adamw", name="x0_lambdas", params=[named["x0_lambdas"]],
             lr=scalar_lr * lr_scale, betas=(0.96, 0.95), weight_decay=0.0, eps=1e-10),
        dict(kind="adamw", name="smear", params=[named[k] for k in ("smear_gate.weight", "smear_lambda",
                                                                     "backout_lambda")],
             lr=0.2, betas=(0.8, 0.95), weight_decay=0.0, eps=1e-10),
    ]
    groups = [g for g in groups if g["params"]]
    by_shape: dict[tuple, list] = {}
    for n, p in named.items():
        if n.startswith("transformer.h."):
            by_shape.setdefault(tuple(p.shape), []).append(p)
    for shape, params in sorted(by_shape.items()):
        groups.append(dict(kind="muon", name=f"muon_{shape[0]}x{shape[1]}", params=params, lr=matrix_lr * lr_scale,
                           momentum=0.95, beta2=0.9, weight_decay=matrix_weight_decay, ns_steps=5))
    covered = {id(p) for g in groups for p in g["params"]}
    leftover = [n for n, p in named.items() if id(p) not in covered]
    if leftover:
        raise ValueError(f"parameters without an optimizer group: {leftover}")
    return groups
