"""The body of the 2-process test of tests/test_distributed.py (spawned; gloo on the CPU)."""

import os

import torch


def run(rank: int, world_size: int, port: int, out: str, workload: str) -> None:
    """One spawned rank: join the gloo group, run the module's function named ``workload``, save what it
    returns to ``{out}.rank{rank}``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(globals()[workload](), f"{out}.rank{rank}")
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


def tune_workloads() -> dict:
    """rl.tune on the default model: single edits (each trial's records shared over the ranks) and
    sequences (a round's trials shared), small enough for CI; trials without their timings."""
    import relation_lens as rl
    from relation_lens.batch_editing import memit_config
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.key_statistics import default_corpus

    model = rl.load_model()
    stats = {l: rl.KeyStatistics.compute(model, l, default_corpus()[:100], n_texts=None, cache=False, progress=False)
             for l in (0, 3, 4)}
    records = list(load_counterfactual())[400:403]
    cfg = rl.EditConfig.default_model_preset(v_steps=4, prefix_lengths=((4, 2),))
    single = rl.tune(model, records[:2], method="relation_rome", config=cfg, stats=stats, budget=2,
                     space={"layer": [4, 0], "v_weight_decay": (), "clamp_norm_factor": (), "v_steps": ()})
    batch = rl.tune(model, records[:2], method="relation_memit", config=memit_config(v_steps=4, prefix_lengths=((4, 2),)),
                    stats=stats, budget=2, batch_size=1,
                    space={"layers": [[3, 4]], "mom2_update_weight": [30.0, 3.0], "clamp_norm_factor": ()})
    seq = rl.tune(model, records, method="relation_rome", config=cfg, stats=stats, budget=3, sequence=1,
                  space={"layer": [4, 0, 3], "v_weight_decay": (), "clamp_norm_factor": (), "v_steps": ()})
    return {name: [{k: v for k, v in t.items() if k != "seconds"} for t in r.trials] + [r.params]
            for name, r in (("single", single), ("batch", batch), ("sequence", seq))}


def sequence_workloads() -> dict:
    """A relation-MEMIT + AlphaEdit sequence of 4 edits in steps of 2 on the default model: its rows, and
    how many z's this process optimised (each step's are shared over the ranks)."""
    import relation_lens as rl
    import relation_lens.editing.memit as memit
    from relation_lens.data.counterfact import load_counterfactual
    from relation_lens.key_statistics import default_corpus

    model = rl.load_model()
    stats = {l: rl.KeyStatistics.compute(model, l, default_corpus()[:100], n_texts=None, cache=False, progress=False)
             for l in (3, 4)}
    records = list(load_counterfactual())[400:404]
    real, calls = memit.optimise_value, []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    memit.optimise_value = counted
    try:
        seq = rl.evaluate_sequence(model, records, method="relation_memit", layers=(3, 4), stats=stats,
                                   config=memit.memit_config(v_steps=4, prefix_lengths=((4, 2),)),
                                   mom2_update_weight=30.0, preserve=rl.Preserve(threshold=2e-2, l2=0.1),
                                   checkpoints=[2, 4], batch_size=2)
    finally:
        memit.optimise_value = real
    return {"rows": list(seq.rows), "restored": seq.restored, "optimised": len(calls)}
