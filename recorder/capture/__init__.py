"""How routing is captured: one tap per engine, both reducing router logits with the registry's gates.

- :mod:`~xici.recorder.capture.hf`: :class:`~xici.recorder.capture.hf.RouterTap`, forward hooks on every
  MoE router of a transformers model (used by :class:`~xici.recorder.hf_backend.HFGenerator`);
- :mod:`~xici.recorder.capture.vllm_worker`: :class:`~xici.recorder.capture.vllm_worker.RoutingCapture`,
  the extension xici mixes into vLLM's worker (driven by :class:`~xici.recorder.vllm_backend.VLLMGenerator`).

Both turn each MoE layer's raw router logits into the top-k expert ids and gate weights with the same
function, the layer's :class:`~xici.moe.gating.LayerGate` from the MoE registry, and both apply per-row
expert masks for ablation; so the two backends record the same quantities.
"""
