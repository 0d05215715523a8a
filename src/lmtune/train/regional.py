"""--compile for training: regional compilation, each repeated block of the model compiled on its own.

Compiling a whole model and its loss as one graph took over 12 minutes for SmolLM2-135M on a 2-core CPU
(30 decoder layers unrolled into one graph). The layers run the same code with different weights, so one
`torch.compile` of the layer's forward serves all of them (their weights are inputs to the graph, not
constants), and with dynamic shapes every batch length: a 6-layer test model compiles at most 2 graphs.
Only forwards that record gradients take the compiled code; validation and generation (a KV cache that
grows a position a step) run the same layers eagerly.

bench (a) in bf16 (SmolLM2-135M LoRA r16, Alpaca, 40% of layers checkpointed, 2 cores): the first step
takes 27-36 s (9-17 s when inductor's cache on disk already has the kernels); then 306 target tokens/s
against 214 eager, at 1936 MB peak against 2096: inductor fuses the element-wise chains around the norms,
SwiGLU, rotary and the casts, and rebuilds cheap results in backward instead of keeping them (so
--recompute-elementwise, whose saved-tensor hooks a compiled graph does not take, is off under --compile).

Anything that cannot be compiled on this machine (no C++ compiler, an op inductor does not take) runs
eagerly with the same results: dynamo's errors are suppressed to a fallback, per compiled frame.
"""

from __future__ import annotations

import torch


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's stack of repeated blocks (decoder layers, encoder layers): the largest ModuleList whose
    modules are all of one class; None when the model has none."""
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    return best


def compile_blocks(model: torch.nn.Module) -> int:
    """Compile the forward of each block of `model` for training, in place; returns how many blocks (0: no
    block stack found, the model is left eager). One compiled function serves every block. Only forwards
    that record gradients take it: validation and generation (greedy answers of a retention set, a cache that
    grows by one position a step) stay eager, instead of compiling a graph per cache length."""
    import types

    import torch._dynamo

    stack = blocks(model)
    if stack is None:
        return 0
    if "forward" in vars(stack[0]):
        return len(stack)
    torch._dynamo.config.suppress_errors = True  # a frame that fails to compile runs eagerly
    eager = type(stack[0]).forward
    compiled = torch.compile(eager, dynamic=True)

    def forward(self, *args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(self, *args, **kwargs)

    for block in stack:
        if "forward" not in vars(block):  # compiled once: a second call (train.choice) keeps that
            block.forward = types.MethodType(forward, block)
    return len(stack)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks`: every block runs its class's own forward again (nothing to do if none was compiled)."""
    stack = blocks(model)
    for block in stack if stack is not None else ():
        vars(block).pop("forward", None)
