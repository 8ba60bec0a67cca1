"""Attention and KV-cache kernels of the engine: Triton kernels for CUDA, their torch versions for CPU.

Callers use kernels.dispatch (one entry point per kernel, the backend chosen per call). The modules:
reference.py (plain torch, the definition of correct), torch_attention.py (vectorised torch, the CPU
engine's path), paged_attention.py / cascade.py / kv_store.py (Triton), prefix_groups.py (cascade plan),
validation.py (the input checks every path shares). Imports torch and triton only.
"""
