"""Experiment: SmolLM2 InfLLMv2 testbed, native vs Stem vs Stem with tile-shared ranking:
perplexity over windows, union entries at QT 4 (last window, all layers), achieved reduction."""
import sys, time, math, json, torch
sys.path.insert(0, '.')
import stem_boost
from stem_boost.testbeds.smollm2_infllmv2 import load_smollm2_infllmv2
from stem_boost.text.corpus import heldout_stream
from stem_boost.kernels.block_union import union_block_lists_torch
torch.set_num_threads(2)
L = int(sys.argv[1]); nwin = int(sys.argv[2]); modes = sys.argv[3].split(',')
reduce = float(sys.argv[4]) if len(sys.argv) > 4 else 0.18
model, tok = load_smollm2_infllmv2()
ids = tok(heldout_stream(), return_tensors='pt').input_ids[0]
wins = [ids[i*L:(i+1)*L] for i in range(nwin)]
def run():
    nll = []
    for w in wins:
        with torch.no_grad():
            logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        nll.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction='none'))
    return torch.cat(nll)
def unions():
    u = e = 0
    for s in stem_boost.last_selections(model):
        if s is None: continue
        uc = union_block_lists_torch(s.idx, s.counts, 4)[2]
        u += int(uc.sum()); e += int(s.counts.sum())
    return u, e
out = {}
for mode in modes:
    t = time.time()
    if mode == 'native':
        stem_boost.wrap(model, reduce=0.0, beta=0.0, keep_selections=True)
    else:
        sched, tt = mode.split(':')
        stem_boost.wrap(model, reduce=reduce, schedule=sched, tile_tokens=int(tt), keep_selections=True)
    nll = run()
    u, e = unions()
    st = stem_boost.stats(model)
    out[mode] = dict(ppl=math.exp(nll.mean()), nll=nll.mean().item(), union=u, entries=e,
                     reduction=round(st['reduce_achieved'], 4))
    base = out.get('native', out[mode])
    print(f"{mode:10s} ppl {out[mode]['ppl']:.4f} ({100*(out[mode]['ppl']/base['ppl']-1):+.2f}%) union4 {u} "
          f"({u/base['union']:.3f} of native) entries {e} ({e/base['entries']:.3f}) red {out[mode]['reduction']} {time.time()-t:.0f}s", flush=True)
print(json.dumps(out))
