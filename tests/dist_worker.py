"""The body of the 2-process test of tests/test_distributed.py (spawned; gloo on the CPU)."""

import os

import torch


def run_workloads(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(workloads(), f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def workloads() -> dict:
    """Statistics and an evaluation on the default model, small enough for CI."""
    import relation_lens as rl
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.key_statistics import default_corpus

    model = rl.load_model()
    stats = rl.KeyStatistics.compute(model, 4, default_corpus()[:300], n_texts=None, batch_size=16, cache=False,
                                     progress=False)
    records = list(load_counterfactual())[:5]
    config = rl.EditConfig.default_model_preset(v_steps=8, prefix_lengths=((4, 2),))
    result = rl.evaluate(model, records, method="relation_rome", layer=4, stats=stats, config=config, fluency=False)
    return {"moment": stats.moment, "count": stats.count, "evaluation": result.to_dict()}
