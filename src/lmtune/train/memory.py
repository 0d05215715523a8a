"""Selective recomputation: keep what matrix multiplies produce, recompute the cheap element-wise work.

Autograd keeps, for backward, every tensor an op needs. In a Llama block most of that memory is
element-wise results that are cheap to rebuild: the RMSNorm outputs (kept by the q/k/v and gate/up
projections, or their LoRA A matrices) and, in the SwiGLU MLP, `act(gate)` (kept by the multiply) and
`act(gate) * up` (kept by the down projection). Each of them can be rebuilt exactly from tensors that
backward keeps anyway: a norm's output from the norm's input, the MLP's products from `gate` and `up`.

`recompute_elementwise(model)` tags those outputs as they are made, and a saved-tensor hook around the
decoder's forward stores a recipe (function + inputs that are kept anyway) instead of a tagged tensor;
backward runs the recipe when it needs the value. Unlike activation checkpointing no matrix multiply runs
twice, and the results are bit-identical. For SmolLM2-135M with LoRA it removes about 40% of the saved
activations.

Under bf16 autocast every projection would cast the fp32 norm output to bf16 on its own and keep that copy
(with LoRA, q, k, v and their A matrices: six copies of one tensor, none of them a tagged one). There the
norm's output is cast once, that bf16 copy is what is tagged, and the projections share it: the same
forward values, but its gradients from several readers are summed in bf16 instead of fp32 (measured on
SmolLM2-135M LoRA: the gradients' error against fp32 gradients 5.80% instead of 5.74%). On bench (a) in
bf16 this took peak RSS from 2764-2803 to 2216-2268 MB, with the same held-out loss.

`save_activation_memory(model, cfg)` applies a run's memory settings in one place: the allocator's mmap
threshold, activation checkpointing of whole blocks (`enable_activation_checkpointing`), this recomputation
in the blocks that keep their activations, and frozen weights in bf16.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import types
import weakref

import torch


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class _Source:
    """A tagged tensor's recipe: a function and inputs that backward keeps anyway. Several ops may save the
    same tensor (q, k and v all keep the norm's output); the value is rebuilt once and dropped after its
    last use."""
    __slots__ = ("ref", "fn", "inputs", "autocast", "uses", "value")

    def __init__(self, out: torch.Tensor, fn, inputs: tuple):
        self.ref, self.fn, self.inputs, self.autocast = weakref.ref(out), fn, inputs, _autocast_state()
        self.uses, self.value = 0, None

    def take(self) -> torch.Tensor:
        if self.value is None:
            (d1, on1, t1), (d2, on2, t2) = self.autocast  # the forward's precision: the value is identical
            with torch.no_grad(), torch.autocast(d1, t1, enabled=on1), torch.autocast(d2, t2, enabled=on2):
                self.value = self.fn(*self.inputs)
        value, self.uses = self.value, self.uses - 1
        if self.uses <= 0:
            self.value = None
        return value


class _Recipe:
    """A saved tensor (the tagged one or a view of it) as its source plus where it lies in the source."""
    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: _Source, view: torch.Tensor, base: torch.Tensor):
        self.source, self.size, self.stride = source, view.size(), view.stride()
        self.offset = view.storage_offset() - base.storage_offset()
        source.uses += 1

    def __call__(self) -> torch.Tensor:
        value = self.source.take()
        return value.as_strided(self.size, self.stride, value.storage_offset() + self.offset)


class _Tags:
    """Tensors that may be saved as a recipe, by storage address (valid while the tensor is alive)."""

    def __init__(self):
        self.by_address: dict[int, _Source] = {}
        self.active = False

    def tag(self, out: torch.Tensor, fn, *inputs: torch.Tensor) -> None:
        if self.active:
            self.by_address[out.untyped_storage().data_ptr()] = _Source(out, fn, inputs)

    def pack(self, t: torch.Tensor):
        source = self.by_address.get(t.untyped_storage().data_ptr()) if t.is_floating_point() else None
        if source is not None:
            base = source.ref()
            if base is not None and base.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() \
                    and base.dtype == t.dtype:
                return _Recipe(source, t, base)
        return t

    @staticmethod
    def unpack(x):
        return x() if isinstance(x, _Recipe) else x


def _is_swiglu_mlp(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _is_norm(m: torch.nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") or isinstance(m, torch.nn.LayerNorm)


PRE_NORM_DECODERS = ("llama", "mistral", "qwen2", "qwen3")


def recompute_elementwise(model: torch.nn.Module) -> int:
    """Patch `model` in place (norms, gated MLPs and the decoder's forward); returns how many modules
    were patched (0: nothing to gain, the model is left as it was)."""
    tags, patched = _Tags(), 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # in these pre-norm decoders a norm's output is read only by projections (never by a residual add, as in
    # BERT's post-norm or Gemma 2's sandwich norms), so it can be handed on already cast
    cast_once = getattr(getattr(base, "config", None), "model_type", "") in PRE_NORM_DECODERS
    for m in model.modules():
        if _is_swiglu_mlp(m):
            def mlp_forward(self, x):  # the same computation as LlamaMLP.forward
                gate, up = self.gate_proj(x), self.up_proj(x)
                act = self.act_fn(gate)
                tags.tag(act, self.act_fn, gate.detach())  # before `act * up` saves it
                h = act * up
                tags.tag(h, lambda g, u, f=self.act_fn: f(g) * u, gate.detach(), up.detach())
                return self.down_proj(h)
            m.forward = types.MethodType(mlp_forward, m)
            patched += 1
        elif _is_norm(m):
            def norm_hook(module, args, out):  # backward's rebuild runs the module again, untagged (inactive)
                if not tags.active:
                    return None
                kind = out.device.type
                if cast_once and out.dtype == torch.float32 and torch.is_autocast_enabled(kind):
                    # under autocast each projection reading the norm casts it again (q, k, v, a LoRA A:
                    # up to six casts, each kept for backward): cast once here, to the same values
                    dtype = torch.get_autocast_dtype(kind)
                    out = out.to(dtype)
                    tags.tag(out, lambda x, f=module, t=dtype: f(x).to(t), args[0].detach())
                    return out
                tags.tag(out, module, args[0].detach())
                return None
            m.register_forward_hook(norm_hook)
            patched += 1
    if not patched:
        return 0
    inner = base.get_decoder() if hasattr(base, "get_decoder") else base
    forward = inner.forward

    def decoder_forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        tags.active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(tags.pack, tags.unpack):
                return forward(*args, **kwargs)
        finally:
            tags.active = False
            tags.by_address.clear()
    inner.forward = decoder_forward
    return patched


def frozen_weights_bf16(model: torch.nn.Module) -> int:
    """Store the frozen nn.Linear weights (a LoRA base) in bf16, for training under bf16 autocast; returns
    the bytes saved.

    Autocast casts an fp32 weight to bf16 at every forward (and keeps that copy for backward), so a frozen
    fp32 weight costs 4 bytes kept + 2 bytes cast, and a cast kernel per use. Stored in bf16 it costs 2 and
    no kernel, and every matmul gets exactly the bf16 values autocast would have made (round to nearest
    even both ways): the losses and gradients are bit-identical. Weights that autocast does not cast stay
    as they are: norms, embeddings and an output layer tied to the embeddings. The model must then run
    under bf16 autocast (the training loop validates under it too); LoRA checkpoints and adapters hold
    only trained weights, so nothing saved changes.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    saved = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and not m.weight.requires_grad and id(m.weight) not in tied \
                and m.weight.dtype == torch.float32:
            for name in ("weight", "bias"):
                p = getattr(m, name)
                if p is not None and not p.requires_grad:
                    saved += p.numel() * 2
                    setattr(m, name, torch.nn.Parameter(p.detach().bfloat16(), requires_grad=False))
    if saved:  # the other weights may still be views of the checkpoint file's mapping, which would then keep
        for p in model.parameters():  # the fp32 matrices' pages resident: give them memory of their own
            if p.dtype == torch.float32:
                p.data = p.data.clone()
    return saved


def set_mmap_threshold(mb: float) -> bool:
    """glibc's M_MMAP_THRESHOLD, fixed at `mb` MB (0: leave glibc's default); False where there is no glibc.

    By default glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), so after the
    first step nearly every activation comes from the heap. Activations of varying sizes (batches grouped
    by length) then leave holes that later ones only partly fill, and the heap keeps them resident:
    measured on SmolLM2-135M LoRA (bench/throughput.py (a), fp32, checkpoint share 0.4), peak RSS
    2824-2858 MB with the default and 2389-2409 MB with 8 MB, the live tensors being the same. Blocks
    above the threshold are mapped when allocated and unmapped when freed, which costs page faults: 1-3%
    of the step time at 8 MB, about 20% at 1 MB."""
    if not mb or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(mb * 2**20)))  # M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def enable_activation_checkpointing(model, share: float = 1.0) -> int:
    """Recompute the blocks' activations in backward instead of keeping them (less memory, ~30% more
    compute with LoRA). `share` < 1 checkpoints only that share of the decoder layers, spread evenly, a
    memory/speed point in between. With frozen embeddings (LoRA) the inputs must require grad for the
    recomputation to count. Returns the number of layers checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):  # layer i is checkpointed when the running share crosses an integer
        layer.gradient_checkpointing = int((i + 1) * share + 1e-9) > int(i * share + 1e-9)
    return sum(layer.gradient_checkpointing for layer in layers)


def save_activation_memory(model, cfg) -> None:
    """--mmap-threshold-mb (the C allocator's policy for large blocks), --activation-checkpointing
    (recompute whole blocks; --checkpoint-share of them) and/or
    --recompute-elementwise (rebuild norms and activation functions in the blocks that keep their
    activations; not under --compile, whose graphs take no saved-tensor hooks); under --bf16, frozen
    weights (a LoRA base) stored in bf16, as autocast would cast them at every use (not under FSDP2,
    whose shards need one dtype)."""
    from lmtune.train import distributed

    set_mmap_threshold(cfg.mmap_threshold_mb)
    share = cfg.checkpoint_share if cfg.activation_checkpointing else 0.0
    if share > 0:
        enable_activation_checkpointing(model, share)
    if share < 1 and cfg.recompute_elementwise and not cfg.compile:
        recompute_elementwise(model)
    if cfg.bf16 and distributed.world().mode != "fsdp":
        frozen_weights_bf16(model)
