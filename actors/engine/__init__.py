"""The engine: requests, scheduler, KV-cache blocks, sampler, model runner."""
