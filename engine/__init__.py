"""The rollout engine: branched world-model decoding over a paged, prefix-cached, copy-on-write KV cache.

Reading order (each file one noun):
    config.py        EngineConfig: block size, KV memory, token budget per step, device, backends
    checkpoint.py    load_checkpoint / write_random_checkpoint (layout.json, world_model/, tokenizer/)
    block_pool.py    KV blocks, ref counts, LRU free queue, the hash -> block prefix-cache index
    kv_cache.py      per-sequence block tables: allocate (cache hits), fork, COW append, commit, free
    sequence.py      a token stream being run (state prefill or branch); plain data
    scheduler.py     continuous batching under a token budget, preemption by recompute; no tensors
    sampler.py       the decoding plan (forced markers, sampled ranges) and the (seed, position) sampler
    model_runner.py  ragged inputs from numpy, COW block copies, forward, sampling; no block pool
    models/llama.py  Llama (RMSNorm, RoPE, SwiGLU, GQA) with attention through kernels.dispatch
    engine.py        Engine (sync API) and AsyncEngine (one background step-loop thread, streaming)
layout.py and image_tokenizer.py are the model-definition modules shared with training.
"""
