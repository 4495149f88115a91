"""Forward pre-hooks on ``model.model.layers[L].mlp.down_proj``: capture and steer neurons.

The input of ``down_proj`` is ``act_fn(gate_proj(x)) * up_proj(x)`` — the neurons. One
pre-hook per layer sees it as ``[batch, tokens, neurons]``, applies the compiled
interventions (see :mod:`engine.steering`; a :class:`~engine.steering.StackedInterventions`
steers each block of batch rows its own way) and records the (possibly steered) value.

With ``keep_graph=True`` the recorded tensors stay in the autograd graph, so
``torch.autograd.grad(objective, hooks.captured)`` gives the *total* derivative through
every later layer. Layer 0's neurons become the graph's leaf when nothing upstream
requires grad (the model's weights are frozen), so a backward never runs through the
embeddings or layer 0's attention. (Swapping *every* layer's input for a detached leaf
would cut the paths through later MLPs and give wrong attributions.)
"""

from __future__ import annotations

import torch

from .steering import CompiledInterventions, StackedInterventions


class NeuronHooks:
    """Context manager that hooks every layer's ``mlp.down_proj``.

    ``offset`` is the absolute position of the first token of the next forward call;
    the generation loop advances it so token ranges stay right with a KV cache.
    """

    def __init__(
        self,
        lm,
        capture: bool = False,
        keep_graph: bool = False,
        interventions: CompiledInterventions | StackedInterventions | None = None,
    ):
        self.lm = lm
        self.capture = capture
        self.keep_graph = keep_graph
        self.interventions = interventions
        self.offset = 0
        self.captured: list[torch.Tensor | None] = [None] * lm.n_layers  # per layer [batch, tokens, neurons]
        self._handles = []

    def _hook(self, layer: int):
        steer = self.interventions if self.interventions and self.interventions.touches(layer) else None

        def hook(module, args):
            x = args[0]
            if steer is not None:
                x = steer.apply(layer, x, self.offset)
            leaf = self.keep_graph and layer == 0 and not x.requires_grad
            if leaf:  # the graph starts here: nothing upstream of layer 0's neurons is differentiated
                x = x.detach().requires_grad_(True)
            if self.capture:
                self.captured[layer] = x if self.keep_graph else x.detach()
            if steer is not None or leaf:
                return (x,) + tuple(args[1:])
            return None

        return hook

    def __enter__(self) -> "NeuronHooks":
        for i, layer in enumerate(self.lm.layers):
            self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stacked(self) -> torch.Tensor:
        """Captured activations as ``[layers, batch, tokens, neurons]``."""
        return torch.stack([c for c in self.captured])
