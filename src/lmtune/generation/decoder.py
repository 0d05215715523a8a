"""Fast decoding for `lmtune generate`: prefill, then one token a step from a static (preallocated) KV cache.

    dec = Decoder(model)                                   # a Hugging Face causal LM (fp32 or bf16 weights)
    out = dec.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, eos_ids=[2], pad_id=2)   # (rows, steps) ids

Why it is faster than `model.generate` on a CPU at small batch: a 135M model spends ~30 ms a token reading
its weights, and Hugging Face's generate adds about as much again in Python (cache objects, mask builders,
logits processors, stopping criteria). Here a Llama-family model runs through a ~40-line forward that
reads the HF model's own weight tensors (q/k/v and gate/up concatenated, so fewer, larger matmuls), writes
keys and values into one preallocated cache and builds no masks per step beyond a slice. Other
architectures go through the model's own forward with a `DynamicCache` (same loop, less speed-up).

Matrices whose fp32 values are exactly GGUF blocks (every layer of a model converted from a Q4_1/Q8_0 GGUF
file, as the default SmolLM2 is) are read in that form through `lmtune.generation.gguf_weights`: the same
fp32 weights and fp32 sums from 0.6-1.1 bytes a weight instead of 4, which is most of a batch-1 token's
time, at the shapes and row counts where that measured faster than the dense matmul on this machine
(`lmtune.generation.kernels`; `LMTUNE_KERNELS=dense|blocks` forces one). Anything else (a fine-tuned model, bf16, no C++ compiler, `gguf_blocks=False`, `LMTUNE_NO_KERNELS=1`)
reads dense tensors.

Greedy output is the same as `model.generate(do_sample=False)`: same left padding, same positions (count of
real tokens), same per-row stop at EOS (a finished row then yields `pad_id`, as HF does), same fp32 math
(RMSNorm in fp32, rotary tables from the model's own rotary module). Sampling applies temperature, then
top-k, then top-p, in HF's order, and draws from a seeded generator.

`quantize="int8"` stores the Llama runner's matrices (and the output layer) as int8 with one scale per output
row and multiplies them with torch's weight-only int8 kernel (bf16 activations in, fp32 back out; norms,
rotary, attention and the cache stay in the model's precision). A decoded token then reads a quarter of
the fp32 bytes. Prefill uses a bf16 copy of the weights instead (the int8 kernel is matrix-vector; bf16
matmuls are fast on CPUs with AMX/AVX512-BF16), and so do batches of up to 16 rows at the shapes where it
measured faster on this machine (lmtune.generation.kernels). The output is no longer identical to fp32
greedy decoding; bench/generate.py states how often it agrees.

`compile=True` compiles the single-token step with torch.compile (static shapes: the cache is attended
over its full, masked length). It costs a compile per (batch, cache length) and pays only where Python
overhead, not weight reading, dominates; measured in bench/generate.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.generation import gguf_weights, kernels
from lmtune.errors import LmtuneError
from lmtune.generation.sampling import pick  # noqa: F401  (the one sampler; also lmtune.generation.decoder.pick)

ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # position-independent tables: safe to precompute


def rms_norm(x, w, eps):
    """LlamaRMSNorm, op for op (in fp32, back to the input dtype before the weight). In fp32 torch's fused
    rms_norm gives the same values in one op instead of six."""
    dtype = x.dtype
    if dtype == torch.float32:
        return F.rms_norm(x, w.shape, w, eps)
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


class Int8:
    """A weight matrix (out, in) as int8 rows with one bf16 scale per row (symmetric, absmax/127), plus a bf16
    copy: torch's int8 kernel is a matrix-vector one (its time grows with the rows), so a few rows (decoding)
    go through it and more rows through the bf16 matmul; where the two cross is measured on the machine
    (`kernel[i]`: rows in kernels.BUCKETS[i] take the int8 kernel; more than 16 rows never do)."""

    def __init__(self, w: torch.Tensor):
        w = w.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        self.q, self.scale = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.bfloat16()
        self.bf16 = w.bfloat16()
        self.kernel = (True,) * len(kernels.BUCKETS)

    @property
    def shape(self) -> torch.Size:
        return self.bf16.shape

    def int8(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    @staticmethod
    def choose(mats: list) -> dict:
        """Sets each matrix's `kernel` to what was measured faster here for its shape and rows; the table."""
        picks, table = kernels.choose(
            "int8", ("dense", "int8"), mats, lambda w: f"{w.shape[0]}x{w.shape[1]}",
            lambda name, w, x: w.int8(x.bfloat16()) if name == "int8" else F.linear(x.bfloat16(), w.bf16),
            lambda w: w.bf16.numel() * 2)
        for w, pick in zip(mats, picks):
            w.kernel = tuple(p == "int8" for p in pick)
        return table


def lora_adapter(module):
    """(A (r, in), B (out, r), scale) of a peft LoRA layer's one active adapter, unmerged; None for a plain
    Linear. Raises ValueError for what the runner does not implement (DoRA and other variants, a LoRA bias,
    several active adapters): those models are merged instead."""
    if not hasattr(module, "lora_A"):
        return None
    names = [n for n in module.active_adapters if n in module.lora_A]
    if module.merged or len(names) != 1 or names[0] in getattr(module, "lora_variant", {}) \
            or module.lora_B[names[0]].bias is not None:
        raise ValueError(f"{type(module).__name__} with adapters {names}: not a single plain LoRA")
    n = names[0]
    return module.lora_A[n].weight.detach(), module.lora_B[n].weight.detach(), module.scaling[n]


def lora_side(*modules):
    """The LoRA adapters of projections whose outputs are concatenated (q, k, v; gate, up) as one (A, B, s):
    A stacks every adapter's A, B is block-diagonal, s the scale of each output. Their contribution
    F.linear(F.linear(x, A), B) * s is, row for row, peft's lora_B(lora_A(x)) * scaling. None if no adapter."""
    parts = [lora_adapter(m) for m in modules]
    if all(p is None for p in parts):
        return None
    outs = [m.weight.shape[0] for m in modules]
    A = torch.cat([p[0] for p in parts if p is not None])
    B = torch.zeros(sum(outs), A.shape[0], dtype=A.dtype, device=A.device)
    s = torch.zeros(sum(outs), dtype=A.dtype, device=A.device)
    row = col = 0
    for p, n in zip(parts, outs):
        if p is not None:
            B[row:row + n, col:col + p[0].shape[0]] = p[1]
            s[row:row + n] = p[2]
            col += p[0].shape[0]
        row += n
    return A, B, s


def linear(x, w, b=None, lora=None):
    """F.linear, or for an Int8 `w` the int8 kernel (few rows) or the bf16 matmul (many), bf16 inside, or
    for a gguf_weights.Block the lossless block kernel (few rows) or the dense fp32 matmul (many); plus an
    unmerged LoRA side (A, B, s) when given, in peft's order."""
    if lora is not None:
        return linear(x, w, b) + F.linear(F.linear(x, lora[0]), lora[1]) * lora[2]
    if isinstance(w, gguf_weights.Block):
        return gguf_weights.linear(x, w, b)
    if not isinstance(w, Int8):
        return F.linear(x, w, b)
    x2 = x.reshape(-1, x.shape[-1]).bfloat16()
    y = w.int8(x2) if kernels.takes(w.kernel, x2.shape[0]) else F.linear(x2, w.bf16)
    y = y.to(x.dtype).view(*x.shape[:-1], -1)
    return y if b is None else y + b


class LlamaRunner:
    """A Llama-family causal LM as plain tensors + one forward that writes into a static KV cache."""

    @staticmethod
    def supports(model) -> bool:
        cfg = model.config
        rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        return (type(model).__name__ == "LlamaForCausalLM" and cfg.hidden_act == "silu"
                and rope in ROPE_TYPES and not getattr(cfg, "sliding_window", None))

    def __init__(self, model, quantize: str = "none", gguf_blocks: bool = True):
        cfg, m = model.config, model.model
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.max_pos = cfg.rms_norm_eps, cfg.max_position_embeddings
        self.rotary, self.dtype = m.rotary_emb, m.embed_tokens.weight.dtype
        cat = lambda *ts: None if ts[0] is None else torch.cat(ts).detach()  # noqa: E731
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                wqkv=cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                bqkv=cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                wo=a.o_proj.weight.detach(), bo=a.o_proj.bias,
                wgu=cat(mlp.gate_proj.weight, mlp.up_proj.weight), bgu=cat(mlp.gate_proj.bias, mlp.up_proj.bias),
                wd=mlp.down_proj.weight.detach(), bd=mlp.down_proj.bias,
                # unmerged LoRA adapters (only when the base stays in block form, see Decoder), or None
                lqkv=lora_side(a.q_proj, a.k_proj, a.v_proj), lo=lora_side(a.o_proj),
                lgu=lora_side(mlp.gate_proj, mlp.up_proj), ld=lora_side(mlp.down_proj)))
        self.emb, self.norm = m.embed_tokens.weight.detach(), m.norm.weight.detach()
        self.head = model.lm_head.weight.detach()
        # which kernel each matrix takes at each row count, as measured here: {shape: [times per row bucket]}
        self.kernels = {}
        keys = ("wqkv", "wo", "wgu", "wd")
        if quantize == "int8":
            for L in self.layers:
                for k in keys:
                    L[k] = Int8(L[k])
            self.head = Int8(self.head)
            self.kernels = Int8.choose([L[k] for L in self.layers for k in keys] + [self.head])
        elif gguf_blocks and self.dtype == torch.float32 and self.emb.device.type == "cpu" and gguf_weights.available():
            # lossless: matrices that are exactly GGUF blocks are read in that form (see lmtune.generation.gguf_weights)
            # for the row counts where the block kernel is the faster one on this machine
            mats = [gguf_weights.factor(L[k]) or L[k] for L in self.layers for k in keys]
            mats, self.kernels = gguf_weights.choose(mats + [gguf_weights.factor(self.head) or self.head])
            for i, w in enumerate(mats[:-1]):
                self.layers[i // len(keys)][keys[i % len(keys)]] = w
            self.head = mats[-1]
        self.k = self.v = None  # the cache: (layers, batch, kv heads, length, head_dim), made by `reset`

    def reset(self, batch: int, length: int) -> None:
        """A cache for `batch` rows of `length` positions (kept when the shape is the same: no reallocation,
        and a compiled step sees the same tensors). Stale entries are masked, never read."""
        shape = (len(self.layers), batch, self.n_kv, length, self.head_dim)
        if self.k is None or self.k.shape != shape:
            dev = self.emb.device
            self.k = torch.zeros(shape, dtype=self.dtype, device=dev)
            self.v = torch.zeros(shape, dtype=self.dtype, device=dev)
            cos, sin = (t[0] for t in self.rotary(self.k[0, :1, 0], torch.arange(length, device=dev)[None]))
            # HF's rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated), exactly: one op less
            half = self.head_dim // 2
            self.cos, self.sin = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def grow(self, length: int) -> None:
        """Make the cache `length` positions long, keeping what it holds (serving's slots grow on demand)."""
        k, v = self.k, self.v
        self.k = None
        self.reset(k.shape[1], length)
        n = min(length, k.shape[3])
        self.k[:, :, :, :n], self.v[:, :, :, :n] = k[:, :, :, :n], v[:, :, :, :n]

    def forward(self, ids, pos, mask, at, kv_len: int, rows=slice(None), last=None):
        """Logits of the last position of `ids` (B, S) at positions `pos` (B, S); keys/values go into cache
        slots `at` (S,), or with `at` (B, 1) each row's one token into its own slot (rows at different
        lengths); attention over the first `kv_len` slots under `mask` (B, 1, S, kv_len, bool). `rows`: the
        cache rows used (a slice, default all); `last` (B,): take each row's logits at this column instead."""
        B, S = ids.shape
        H, KV, D = self.n_head, self.n_kv, self.head_dim
        x = F.embedding(ids, self.emb)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # (B, 1, S, D)
        if at.dim() == 2 and B == 1:  # one row (a server's lone request): its slot written as generate writes it
            at = at[0]
        each = torch.arange(B) if at.dim() == 2 else None
        if mask is not None and mask.dtype == torch.bool:  # additive once here, not again in each layer's attention
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, L in enumerate(self.layers):
            # attention: one matmul for q, k, v; rotary on q and k together; cache write in place
            qkv = linear(rms_norm(x, L["ln1"], self.eps), L["wqkv"], L["bqkv"], L["lqkv"])
            qkv = qkv.view(B, S, H + 2 * KV, D).transpose(1, 2)
            qk = qkv[:, :H + KV]
            qk = qk * cos + qk.roll(D // 2, -1) * sin
            kc, vc = self.k[i, rows], self.v[i, rows]
            if each is None:
                kc.index_copy_(2, at, qk[:, H:])
                vc.index_copy_(2, at, qkv[:, H + KV:])
            else:  # one token per row, each at its own slot
                kc[each, :, at[:, 0]] = qk[:, H:, 0]
                vc[each, :, at[:, 0]] = qkv[:, H + KV:, 0]
            y = F.scaled_dot_product_attention(qk[:, :H], kc[:, :, :kv_len], vc[:, :, :kv_len],
                                               attn_mask=mask, scale=D ** -0.5, enable_gqa=KV != H)
            x = x + linear(y.transpose(1, 2).reshape(B, S, H * D), L["wo"], L["bo"], L["lo"])
            # MLP: gate and up in one matmul
            g, u = linear(rms_norm(x, L["ln2"], self.eps), L["wgu"], L["bgu"], L["lgu"]).chunk(2, dim=-1)
            x = x + linear(F.silu(g) * u, L["wd"], L["bd"], L["ld"])
        x = x[:, -1] if last is None else x[torch.arange(B), last]
        return linear(rms_norm(x, self.norm, self.eps), self.head).float()

    def step(self, tok, pos, valid, at):
        """One token per row (B, 1) at slot `at`; attention over the whole cache, padding masked by `valid`.
        Static shapes, so torch.compile can take it whole."""
        return self.forward(tok, pos, valid[:, None, None, :], at, valid.shape[1])


class HFRunner:
    """Any other causal LM: its own forward with a DynamicCache, driven by the same loop."""

    def __init__(self, model):
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def reset(self, batch: int, length: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()

    def forward(self, ids, pos, mask, at, kv_len: int):
        # mask is the 2D key mask here: HF builds the causal part itself
        return self.model(input_ids=ids, attention_mask=mask.long(), position_ids=pos, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1].float()

    def step(self, tok, pos, valid, at):
        return self.forward(tok, pos, valid[:, :int(at[0]) + 1], at, 0)


class Decoder:
    """Greedy or sampled generation for a batch of prompts (token id lists of any lengths, left-padded)."""

    def __init__(self, model, *, compile: bool = False, quantize: str = "none", gguf_blocks: bool = True,
                 keep_model: bool = False):
        # keep_model: never merge an adapter into `model` (serve shares it with a task's predict): a model
        # that cannot run unchanged goes through its own forward instead
        kernels.forced()  # a bad LMTUNE_KERNELS is an error whatever the model
        if keep_model and not self.runs_unchanged(model):
            model.eval()
            self.runner, self.fast, self.compile, self._step = HFRunner(model), False, False, None
            return
        if getattr(model, "peft_config", None):
            # a LoRA model: on a base in GGUF block form the adapters stay apart (merging would leave the
            # block form, and a dense model reads 4 bytes a weight); otherwise they are merged into the weights
            if gguf_blocks and not compile and quantize == "none" and self.block_base_lora(model):
                model = model.get_base_model()
            else:
                model = model.merge_and_unload()
        model.eval()
        self.device = next(model.parameters(), torch.empty(0)).device
        if quantize == "int8" and self.device.type != "cpu":
            raise LmtuneError(f"--quantize int8 is a CPU decoding path (torch's int8 matrix-vector kernel); "
                              f"on {self.device.type} leave --quantize none (bf16 is the default on CUDA)")
        if quantize != "none" and not LlamaRunner.supports(model):
            raise LmtuneError(f"--quantize {quantize} works for Llama-family models; "
                              f"{type(model).__name__} is not one (leave --quantize none)")
        # a compiled step can't call the block kernel (ctypes): it reads dense weights
        self.runner = (LlamaRunner(model, quantize, gguf_blocks and not compile) if LlamaRunner.supports(model)
                       else HFRunner(model))
        self.fast = isinstance(self.runner, LlamaRunner)
        self.compile = compile and self.fast
        # on CUDA the compiled step is also captured as a CUDA graph (one launch a token instead of hundreds)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self._step = torch.compile(self.runner.step, dynamic=False, fullgraph=True, mode=mode) if self.compile else None

    def _guarded_step(self, *args):
        """The compiled step; if this machine cannot compile it (no Triton, an unsupported GPU), the same
        static-shape step eagerly from then on, with a note."""
        try:
            return self._step(*args)
        except Exception as e:  # noqa: BLE001 - any backend failure; the eager step gives the same tokens
            import sys

            print(f"note: --compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                  "decoding without it", file=sys.stderr)
            self._step = self.runner.step
            return self._step(*args)

    @staticmethod
    def runs_unchanged(model) -> bool:
        """Whether Decoder(model) leaves `model` as it is and decodes it as its own forward would: no
        autocast around, every parameter in one dtype, and no adapter to merge (none, or LoRA kept apart)."""
        if torch.is_autocast_enabled("cpu") or (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")):
            return False
        if len({p.dtype for p in model.parameters()}) != 1 or len({p.device for p in model.parameters()}) != 1:
            return False
        return not getattr(model, "peft_config", None) or Decoder.block_base_lora(model)

    @staticmethod
    def block_base_lora(model) -> bool:
        """Whether a peft model is plain LoRA on a Llama whose base weights are GGUF blocks (so that the
        runner reads the base in block form and adds the adapters unmerged)."""
        base = model.get_base_model()
        if not LlamaRunner.supports(base) or getattr(model, "modules_to_save", None) or not gguf_weights.available() \
                or next(base.parameters()).device.type != "cpu":  # the block kernel is a CPU one
            return False
        layers = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        try:
            tuned = [(name, lora_adapter(m)) for name, m in base.named_modules() if hasattr(m, "lora_A")]
        except ValueError:
            return False
        if not tuned or any(name.rsplit(".", 1)[-1] not in layers for name, _ in tuned):
            return False
        first = base.model.layers[0].mlp.gate_proj
        return gguf_weights.factor(getattr(first, "base_layer", first).weight) is not None

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, eos_ids=(), pad_id: int = 0,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 on_token=None):
        """(rows, steps) token ids, as HF's generate returns them after the prompt: a row that hit EOS keeps
        the EOS and then holds `pad_id`; steps stop when every row is done or at `max_new_tokens`.
        `on_token(ids)`, if given, sees each step's (rows,) ids as soon as they are picked (streaming)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise LmtuneError("generate needs at least one prompt, and no empty prompt")
        B, S = len(prompts), max(len(p) for p in prompts)
        # the cache length: rounded up so that a compiled step is reused across nearby prompt lengths
        length = S + max_new_tokens
        if self.fast and length > self.runner.max_pos:
            raise LmtuneError(f"prompt ({S} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"{self.runner.max_pos} positions")
        if self.compile:
            length = min(-(-length // 128) * 128, self.runner.max_pos)
        self.runner.reset(B, length)

        dev = self.device
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        valid = torch.zeros((B, length), dtype=torch.bool)  # which cache slots hold a real token, per row
        for i, p in enumerate(prompts):  # left padding: every row's last prompt token is in column S-1
            ids[i, S - len(p):] = torch.tensor(p)
            valid[i, S - len(p):S] = True
        ids, valid = ids.to(dev), valid.to(dev)
        pos = (valid[:, :S].long().cumsum(1) - 1).clamp(min=0)  # positions count real tokens only
        # prefill: causal attention among real tokens; a padding query sees itself (no empty softmax row)
        causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
        mask = (causal & valid[:, None, :S]) | torch.eye(S, dtype=torch.bool, device=dev)
        if isinstance(self.runner, HFRunner):
            mask = valid[:, :S]
        logits = self.runner.forward(ids, pos, mask[:, None] if self.fast else mask, torch.arange(S, device=dev), S)

        eos = torch.tensor(list(eos_ids), dtype=torch.long, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed if seed is not None else torch.seed())
        step = self._guarded_step if self._step else self.runner.step
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out, pos = [], pos[:, -1:]
        for n in range(max_new_tokens):
            tok = pick(logits, temperature, top_k, top_p, gen).masked_fill(done, pad_id)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            done |= torch.isin(tok, eos)
            if n == max_new_tokens - 1 or bool(done.all()):
                break
            t = S + n  # the cache slot of this token
            valid[:, t] = True
            pos = pos + 1
            at = torch.tensor([t], device=dev)
            if self.fast and not self.compile:  # eager: attend over the filled slots only
                logits = self.runner.forward(tok[:, None], pos, valid[:, None, None, :t + 1], at, t + 1)
            else:
                logits = step(tok[:, None], pos, valid, at)
                if self.compile and dev.type == "cuda":
                    logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        return torch.stack(out, 1)
