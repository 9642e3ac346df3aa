"""Greedy decoding through the engine's own steps, recording the logits of every computed
position (the parity tests and the compiled-loop test compare them)."""

import torch

from ferrolm import SamplingParams


def step_logits(eng, prompt, steps):
    """One greedy request through the engine's own steps, as it serves (each step's
    last-token logits, decode steps through CUDA graphs where they apply): (its token ids,
    the logits of every step, on the CPU)."""
    eng.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    seq = eng.requests["p"].seqs[0]
    out = []
    while eng.has_unfinished():
        batch = eng.scheduler.schedule()
        logits = eng.runner.execute(batch)
        for item in batch:
            item.seq.num_computed += item.num_new_tokens
        out.append(logits[0].cpu())
        eng._append_token(seq, int(logits[0].argmax()), None)
    return seq.token_ids, out


def run_recording_logits(llm, prompts, steps):
    """Greedy-decode `steps` tokens per prompt as one batch; logits of every computed position."""
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, params)
    seqs = [eng.requests[rid].seqs[0] for rid in ids]
    logits = {s.seq_id: [] for s in seqs}
    while eng.has_unfinished():
        batch = eng.scheduler.schedule()
        out = eng.runner.execute(batch, all_logits=True)
        rows = torch.split(out, [item.num_new_tokens for item in batch])
        for item, r in zip(batch, rows):
            logits[item.seq.seq_id].append(r)
            item.seq.num_computed += item.num_new_tokens
            if item.seq.num_computed == item.seq.num_tokens:
                eng._append_token(item.seq, int(r[-1].argmax()), None)
    for rid in ids:
        del eng.requests[rid]
    return [(s.token_ids, torch.cat(logits[s.seq_id])) for s in seqs]
